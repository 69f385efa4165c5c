"""The training pipeline: data -> fit -> calibrate -> test -> core checkpoint.

:func:`fit` is a plain function of a :class:`TrainConfig` so that the CLI calls it in
process and a Ray Train worker calls it with its own strategy, plugins and callbacks.
Its run folder holds what is needed to resume or repeat the run::

    <run_dir>/config.yaml        the resolved configuration
    <run_dir>/split.csv          the frozen train/val/test split
    <run_dir>/checkpoints/*.ckpt resumable Lightning checkpoints (best k by val loss, last)
    <run_dir>/logs/metrics.csv   scalar metrics per step / evaluation
    <run_dir>/report.json        final validation and test metrics, temperature, timings

The deliverable is ``cfg.out``: a core checkpoint (:func:`lungvit.core.model.checkpoint.save_checkpoint`)
of the plain model with its labels, preprocessing, calibration temperature and provenance.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lungvit.core.model.checkpoint import CheckpointInfo, Provenance, save_checkpoint
from lungvit.core.predict import energy_score
from lungvit.core.model.reference import read_training_checkpoint
from lungvit.training.learn.calibration import fit_temperature
from lungvit.training.learn.compare import compare_with_base
from lungvit.training.config import TrainConfig
from lungvit.training.data.discover import count_sources
from lungvit.training.data.datamodule import ScanDataModule
from lungvit.training.learn.metrics import classification_report, scalar_metrics
from lungvit.training.learn.module import FreezeEarlyLayers, LungViTModule, class_weights_from_counts
from lungvit.training.learn.ood_fit import attach_feature_detector
from lungvit.training.learn.setup import (build_datamodule, build_training_model, resolve_config,
                                          resolve_precision)
from lungvit.training.learn.transfer import mix_with_base, plan_transfer

# Inputs whose energy exceeds this quantile of the validation energies are flagged by the
# Predictor as unlike the training data (about 1 in 100 familiar scans is flagged).
OOD_ENERGY_QUANTILE = 0.99

DEFAULT_INTENDED_USE = ("Research and evaluation of LungViT on data like its training set. "
                        "Not a medical device: not for diagnosis or clinical decisions.")


@dataclass
class FitResult:
    """What one training run produced.

    Attributes:
        run_dir: the run folder.
        checkpoint: the core checkpoint written (None on non-zero distributed ranks).
        metrics: validation report of the weights kept (best validation loss).
        test_metrics: test report with the calibrated temperature.
        test_metrics_uncalibrated: test report at temperature 1.
        temperature: the fitted calibration temperature.
        wall_time_s: seconds spent in ``Trainer.fit``.
        epochs: epochs completed; steps: optimizer steps taken.
        best_lightning_checkpoint: the resumable checkpoint with the lowest val loss, if any.
        config: the resolved configuration.
        data: the data module's summary (classes, counts, unreadable, too small, ...).
        head_mapping: for fine-tuning, how the old head's labels were carried over.
        transfer: the transfer policy the run used (:mod:`lungvit.training.learn.transfer`).
        comparison: the base model vs this one on the test split
            (:func:`lungvit.training.learn.compare.compare_with_base`), None without a base.
    """

    run_dir: Path
    checkpoint: Path | None
    metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    test_metrics_uncalibrated: dict[str, Any]
    temperature: float
    wall_time_s: float
    epochs: int
    steps: int
    best_lightning_checkpoint: str | None
    config: TrainConfig
    data: dict[str, Any] = field(default_factory=dict)
    head_mapping: dict[str, list[str]] | None = None
    transfer: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def collect_logits(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (eval mode, fp32) over a loader of (x, y).

    Returns:
        (N, C) logits and (N,) targets, on the CPU.
    """
    model = model.to(device).eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)


def _load_module_weights(module: LungViTModule, ckpt_path: str) -> None:
    """Put the plain model's weights from a Lightning checkpoint into ``module.model``."""
    ckpt = read_training_checkpoint(ckpt_path)  # no code: its path came from a checkpoint
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    module.model.load_state_dict(state)


def _hardware(trainer: L.Trainer) -> dict[str, Any]:
    gpu = isinstance(trainer.accelerator, L.pytorch.accelerators.CUDAAccelerator)
    return {
        "accelerator": type(trainer.accelerator).__name__.replace("Accelerator", "").lower(),
        "gpu_type": torch.cuda.get_device_name(0) if gpu else "",
        "gpu_count": trainer.world_size if gpu else 0,
        "world_size": trainer.world_size,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def _energy_threshold(logits: torch.Tensor) -> float | None:
    if logits.numel() == 0:
        return None
    return float(torch.quantile(energy_score(logits), OOD_ENERGY_QUANTILE))


def _fsspec_rereads_umask() -> None:
    """Make fsspec read the process's umask again before Lightning writes checkpoints.

    fsspec caches the umask of its first local write (``get_umask`` is ``lru_cache``d) and
    chmods every file it commits with it, so a process that wrote once under umask 022 would
    write later checkpoints 644 even under the owner-only umask the CLI sets.
    """
    try:
        from fsspec.implementations.local import get_umask
    except ImportError:  # fsspec (a Lightning dependency) changed: nothing cached to clear
        return
    clear = getattr(get_umask, "cache_clear", None)
    if clear is not None:
        clear()


def _train_sources(dm: ScanDataModule) -> dict[str, dict[str, int]]:
    """Training-split images per class and source ({} when no sample names its source)."""
    train = [dm.samples[i] for i in dm.splits["train"]]
    if all(s.source is None for s in train):
        return {}
    return count_sources(train, dm.classes)


def _format_notes(cfg: TrainConfig, test: dict[str, Any]) -> str:
    acc = test.get("acc")
    measured = (f"Accuracy on the held-out test split of its training data: {acc:.1%} "
                f"({test['n']} images)." if acc is not None else "")
    return " ".join(x for x in (cfg.notes or "", measured) if x)


# ------------------------------------------------------------------------------- the run
def fit(cfg: TrainConfig, *, datamodule: ScanDataModule | None = None,
        callbacks: Iterable[Callback] = (), progress: bool = True, strategy: Any = None,
        plugins: Any = None, extra_trainer_kwargs: dict[str, Any] | None = None) -> FitResult:
    """Train, calibrate, test and write the core checkpoint ``cfg.out``.

    Args:
        cfg: the run's configuration (resolved here if it is not yet).
        datamodule: an already set-up data module of this config (the CLI builds one to
            report the data before training); None: built here.
        callbacks: extra Lightning callbacks (e.g. a Ray report callback).
        progress: show a progress bar and model summary.
        strategy, plugins: passed to ``L.Trainer`` (e.g. Ray's DDP strategy and environment).
        extra_trainer_kwargs: further ``L.Trainer`` arguments; they override ours.

    Returns:
        A :class:`FitResult`. Under distributed training every rank trains; only rank 0
        evaluates and writes files, the others return with ``checkpoint=None``.
    """
    cfg = resolve_config(cfg)  # idempotent: a resolved config stays as it is
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    dm = datamodule if datamodule is not None else build_datamodule(cfg)
    classes = list(dm.classes)

    model, head_mapping = build_training_model(cfg, classes)
    # The adapted base, kept for weight-space ensembling after training.
    base_state = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                  if cfg.from_checkpoint and cfg.base_mix > 0 else None)
    # The adapted base answers the training images for the distillation term (LwF).
    kept = head_mapping["kept"] if head_mapping else []
    teacher = copy.deepcopy(model) if cfg.distill > 0 and kept else None
    transfer = plan_transfer(cfg, dm.class_counts["train"], model)
    transfer.apply(model)  # freezes what the policy holds fixed for the whole run
    weights = (class_weights_from_counts([dm.class_counts["train"][c] for c in classes])
               if cfg.class_weighting else None)
    module = LungViTModule(model, labels=classes, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           warmup_steps=cfg.warmup_steps, warmup_frac=cfg.warmup_frac,
                           min_lr_ratio=cfg.min_lr_ratio, label_smoothing=cfg.label_smoothing,
                           class_weights=weights, grad_checkpointing=cfg.grad_checkpointing,
                           lr_scales=transfer.lr_scales(model), teacher=teacher,
                           distill=cfg.distill, distill_temperature=cfg.distill_temperature,
                           distill_classes=[classes.index(c) for c in kept])

    precision = resolve_precision(cfg.precision, cfg.accelerator)
    if precision != "32-true" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    ckpt_cb = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", monitor="val/loss", mode="min",
        save_top_k=cfg.keep_best_k, save_last=True,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        filename="step{step:06d}-val_loss{val/loss:.4f}", auto_insert_metric_name=False)
    cbs: list[Callback] = [ckpt_cb]
    if cfg.early_stopping_patience > 0:
        cbs.append(EarlyStopping(monitor="val/loss", mode="min",
                                 patience=cfg.early_stopping_patience, check_finite=True))
    if cfg.freeze_stem_epochs > 0:
        cbs.append(FreezeEarlyLayers(cfg.freeze_stem_epochs, cfg.freeze_blocks))
    cbs.extend(transfer.callbacks())
    if progress:
        cbs.append(TQDMProgressBar(refresh_rate=1))
    cbs.extend(callbacks)

    train_batches = max(1, math.ceil(len(dm.datasets["train"]) / cfg.batch_size))
    kwargs: dict[str, Any] = dict(
        max_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, accelerator=cfg.accelerator,
        devices=cfg.devices, precision=precision, gradient_clip_val=1.0,
        callbacks=cbs, logger=CSVLogger(run_dir, name="logs", version=""),
        default_root_dir=run_dir, enable_progress_bar=progress, enable_model_summary=progress,
        log_every_n_steps=min(50, train_batches), fast_dev_run=cfg.fast_dev_run,
        deterministic=False)
    if cfg.val_every_n_steps is not None:
        kwargs["check_val_every_n_epoch"] = None
    if strategy is not None:
        kwargs["strategy"] = strategy
    if plugins is not None:
        kwargs["plugins"] = plugins
    kwargs.update(extra_trainer_kwargs or {})
    trainer = L.Trainer(**kwargs)
    # Accumulation and the validation interval (in batches) depend on the world size,
    # which only the trainer knows (the strategy may be Ray's); both are read at fit time.
    world = trainer.world_size
    accumulate = max(1, math.ceil(cfg.global_batch / (cfg.batch_size * world))) \
        if cfg.global_batch else 1
    trainer.accumulate_grad_batches = accumulate
    if cfg.val_every_n_steps is not None and not cfg.fast_dev_run:
        trainer.val_check_interval = cfg.val_every_n_steps * accumulate

    if trainer.is_global_zero:
        cfg.save(run_dir / "config.yaml")
        if not Path(cfg.split_manifest).exists():
            dm.save_split_manifest(cfg.split_manifest)

    started = time.perf_counter()
    _fsspec_rereads_umask()
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.resume_from)
    wall = time.perf_counter() - started

    best = ckpt_cb.best_model_path or None
    if not trainer.is_global_zero:
        return FitResult(run_dir, None, {}, {}, {}, 1.0, wall, trainer.current_epoch,
                         trainer.global_step, best, cfg, dm.summary(), head_mapping,
                         transfer.to_dict())
    if best and not cfg.fast_dev_run:
        _load_module_weights(module, best)  # keep the weights with the lowest val loss
    model = module.model
    if base_state is not None:
        new_rows = [classes.index(c) for c in (head_mapping or {}).get("new", [])]
        mix_with_base(model, base_state, cfg.base_mix, fresh_rows=new_rows)
    plan = {**transfer.to_dict(), "base_mix": cfg.base_mix if base_state is not None else 0.0,
            "distill": cfg.distill if teacher is not None else 0.0}
    device = torch.device("cuda") if _hardware(trainer)["gpu_count"] else torch.device("cpu")
    val_logits, val_targets = collect_logits(model, dm.val_dataloader(), device)
    test_logits, test_targets = collect_logits(model, dm.test_dataloader(), device)
    model.cpu()
    temperature = fit_temperature(val_logits, val_targets)
    val_report = classification_report(val_logits, val_targets, labels=classes,
                                       temperature=temperature)
    test_raw = classification_report(test_logits, test_targets, labels=classes)
    test_cal = classification_report(test_logits, test_targets, labels=classes,
                                     temperature=temperature)
    hardware = _hardware(trainer)
    training = {"steps": int(trainer.global_step), "epochs": int(trainer.current_epoch),
                "precision": precision, "batch_size": cfg.batch_size,
                "accumulate_grad_batches": accumulate,
                "global_batch": cfg.batch_size * accumulate * world,
                "stopped_early": bool(trainer.should_stop and not cfg.fast_dev_run),
                "hardware": hardware, "best_lightning_checkpoint": best}
    metrics = {
        "accuracy": test_cal["acc"], "macro_f1": test_cal["macro_f1"],
        "balanced_accuracy": test_cal["balanced_acc"], "macro_auc": test_cal["macro_auc"],
        "ece": test_cal["ece"], "ece_uncalibrated": test_raw["ece"],
        "test": test_cal, "test_uncalibrated": scalar_metrics(test_raw),
        "val": scalar_metrics(val_report),
        "data": {"counts": dm.class_counts, "unreadable": len(dm.unreadable),
                 "too_small": dict(dm.too_small), "fingerprint": dm.fingerprint},
        "training": training,
        "ood": {"energy_threshold": _energy_threshold(val_logits),
                "quantile": OOD_ENERGY_QUANTILE, "source": "validation split"},
    }
    comparison = compare_with_base(cfg, dm, test_logits, test_targets, device)
    metrics.update(transfer=plan, comparison=comparison)
    train_counts = dm.class_counts["train"]
    sizes = "/".join(str(sum(dm.class_counts[s].values())) for s in ("train", "val", "test"))
    provenance = Provenance(
        dataset=(f"{Path(dm.index.root).name}: {sum(dm.class_counts['total'].values())} images "
                 f"in {len(classes)} classes; train/val/test {sizes}"),
        class_counts=dict(train_counts), class_sources=_train_sources(dm),
        citations=list(cfg.citations), dataset_fingerprint=dm.fingerprint,
        epochs=int(trainer.current_epoch), train_time_s=round(wall, 2),
        gpu_type=hardware["gpu_type"], gpu_count=hardware["gpu_count"],
        source=f"fine-tuned from {Path(cfg.from_checkpoint).name}" if cfg.from_checkpoint else "")
    info = CheckpointInfo(labels=tuple(classes), preprocess=dm.preprocess,
                          model=model.lungvit_config, temperature=temperature,
                          provenance=provenance, metrics=metrics,
                          notes=_format_notes(cfg, test_cal),
                          intended_use=cfg.intended_use or DEFAULT_INTENDED_USE)
    info = attach_feature_detector(info, model, dm, device)  # learned out-of-scope detector
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = save_checkpoint(out, model, info)
    report = {"checkpoint": str(checkpoint), "temperature": temperature, "wall_time_s": wall,
              "val": val_report, "test": test_cal, "test_uncalibrated": test_raw,
              "training": training, "data": dm.summary(), "head_mapping": head_mapping,
              "transfer": plan, "comparison": comparison,
              "history": module.history}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return FitResult(run_dir=run_dir, checkpoint=checkpoint, metrics=val_report,
                     test_metrics=test_cal, test_metrics_uncalibrated=test_raw,
                     temperature=temperature, wall_time_s=wall,
                     epochs=int(trainer.current_epoch), steps=int(trainer.global_step),
                     best_lightning_checkpoint=best, config=cfg, data=dm.summary(),
                     head_mapping=head_mapping, transfer=plan,
                     comparison=comparison)
