"""The LightningModule that trains a plain LungViT model, and the callbacks that go with it.

:class:`LungViTModule` holds no architecture: it wraps whatever ``nn.Module`` maps
(B, 1, S, S) images to (B, C) logits (``self.model``), and adds the loss, the optimizer and
its schedule, and the evaluation metrics. The deliverable of training is ``self.model``'s
own state dict in a core checkpoint; Lightning's ``.ckpt`` files are for resuming only.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lungvit.training.learn.metrics import classification_report, scalar_metrics
from lungvit.training.learn.optim import parameter_groups


def scaled_parameter_groups(model: nn.Module, weight_decay: float, lr: float,
                            scales: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: :func:`parameter_groups` split by rate.

    Args:
        model: the model to optimise.
        weight_decay: decay of the weight matrices.
        lr: the base learning rate.
        scales: parameter name -> factor of ``lr`` (missing names: 1); None: one rate.

    Returns:
        Groups with ``params``, ``weight_decay`` and ``lr`` (one per decay setting and rate),
        covering every parameter that requires a gradient once and no other.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for group in parameter_groups(model, weight_decay):
        for p in group["params"]:
            if not p.requires_grad:
                continue
            scale = 1.0 if scales is None else float(scales.get(names[id(p)], 1.0))
            groups.setdefault((group["weight_decay"], scale), []).append(p)
    return [{"params": params, "weight_decay": wd, "lr": lr * scale}
            for (wd, scale), params in sorted(groups.items(), key=lambda kv: -kv[0][1])]


def class_weights_from_counts(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency class weights, normalised so the average sample weight is 1.

    ``w_c = N / (C * n_c)`` (scikit-learn's "balanced"); a class with no samples gets 0.
    """
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    present = n > 0
    if not present.any():
        raise ValueError("class_weights_from_counts: every class count is zero")
    w = torch.zeros_like(n)
    w[present] = n.sum() / (present.sum() * n[present])
    return w.float()


@dataclass
class WarmupCosine:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``min_ratio``.

    A callable object (not a closure) so ``LambdaLR`` stores it in its state dict and a
    resumed run continues the very same schedule.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.01

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LungViTModule(L.LightningModule):
    """Cross-entropy training of a LungViT model with AdamW and warm-up + cosine decay.

    Args:
        model: a plain model mapping (B, 1, S, S) to (B, C) logits.
        labels: the C class names, in output order.
        lr: peak learning rate.
        weight_decay: AdamW weight decay on weight matrices.
        warmup_steps: linear warm-up in optimizer steps; None: ``warmup_frac`` of the total.
        warmup_frac: warm-up as a fraction of ``trainer.estimated_stepping_batches``.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        label_smoothing: cross-entropy label smoothing (training loss only).
        class_weights: (C,) loss weights (training loss only), e.g. from
            :func:`class_weights_from_counts`; None: unweighted.
        grad_checkpointing: recompute each block's activations in backward (timm).
        lr_scales: parameter name -> factor of ``lr`` (e.g. layer-wise decay, see
            :mod:`lungvit.training.learn.transfer`); None: one rate. Parameters with
            ``requires_grad=False`` are left out of the optimizer.

    The validation loss (monitored by early stopping and checkpointing) is the plain,
    unweighted, unsmoothed cross-entropy, so runs with different settings compare.
    """

    def __init__(self, model: nn.Module, *, labels: Sequence[str], lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int | None = None,
                 warmup_frac: float = 0.05, min_lr_ratio: float = 0.01,
                 label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                 grad_checkpointing: bool = False,
                 lr_scales: Mapping[str, float] | None = None,
                 teacher: nn.Module | None = None, distill: float = 0.0,
                 distill_temperature: float = 2.0,
                 distill_classes: Sequence[int] | None = None) -> None:
        super().__init__()
        self.model = model
        # Not a registered submodule: the teacher is not trained, saved or put in train mode.
        # It is used only with a weight and the output columns it shares with the model.
        if teacher is not None and not (distill > 0 and distill_classes):
            teacher = None
        self.__dict__["_teacher"] = (teacher.eval().requires_grad_(False) if teacher is not None
                                     else None)
        self.distill, self.distill_temperature = distill, distill_temperature
        self._distill_classes = list(distill_classes or [])
        self.labels = list(labels)
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.warmup_frac = warmup_frac
        self.min_lr_ratio = min_lr_ratio
        self.label_smoothing = label_smoothing
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if class_weights.shape != (len(self.labels),):
                raise ValueError(f"class_weights has shape {tuple(class_weights.shape)}, "
                                 f"expected ({len(self.labels)},)")
        self.register_buffer("class_weights", class_weights, persistent=False)
        if grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
            model.set_grad_checkpointing(True)
        self.lr_scales = dict(lr_scales) if lr_scales is not None else None
        self.save_hyperparameters(ignore=["model", "class_weights", "lr_scales", "teacher"])
        # Outputs of the running evaluation, and the reports of finished ones.
        self._eval_logits: list[torch.Tensor] = []
        self._eval_targets: list[torch.Tensor] = []
        self.last_reports: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, C)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                      batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, 1, S, S), (B,)
        logits = self.model(x)  # (B, C)
        loss = F.cross_entropy(logits, y, weight=self.class_weights,
                               label_smoothing=self.label_smoothing)
        if self._teacher is not None:
            loss = loss + self.distill * self._distillation(x, logits)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(y), sync_dist=True)
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        return loss

    def _distillation(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) over the shared classes at temperature T, times T^2."""
        idx = self._distill_classes
        t = self.distill_temperature
        with torch.no_grad():
            target = F.softmax(self._teacher(x)[:, idx].float() / t, dim=1)
        log_student = F.log_softmax(logits[:, idx].float() / t, dim=1)
        kd = F.kl_div(log_student, target, reduction="batchmean") * t * t
        self.log("train/distill", kd, on_step=False, on_epoch=True, batch_size=len(x),
                 sync_dist=True)
        return kd

    def on_fit_start(self) -> None:
        if self._teacher is not None:  # unregistered, so Lightning does not move it
            self._teacher.to(self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers(use_pl_optimizer=False)
        self.log("lr", opt.param_groups[0]["lr"], on_step=True, on_epoch=False, prog_bar=False)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = scaled_parameter_groups(self.model, self.weight_decay, self.lr, self.lr_scales)
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = (self.warmup_steps if self.warmup_steps is not None
                  else int(round(self.warmup_frac * total)))
        warmup = min(warmup, max(0, total - 1))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(warmup, total, self.min_lr_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    # --------------------------------------------------------------- evaluation
    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits = self.model(x)  # (B, C)
        self._eval_logits.append(logits.detach().float())
        self._eval_targets.append(y.detach())

    def _eval_end(self, stage: str) -> None:
        if not self._eval_logits:
            return
        logits = torch.cat(self._eval_logits)  # (n, C)
        targets = torch.cat(self._eval_targets)  # (n,)
        self._eval_logits, self._eval_targets = [], []
        if self.trainer.world_size > 1:
            # Distributed samplers give every rank the same number of samples (padded), so
            # all_gather returns (world, n, C); every rank then computes the same report.
            logits = self.all_gather(logits).flatten(0, 1)
            targets = self.all_gather(targets).flatten(0, 1)
        report = classification_report(logits, targets, labels=self.labels)
        scalars = scalar_metrics(report)
        for key, value in scalars.items():
            self.log(f"{stage}/{key}", value, sync_dist=True, prog_bar=key in ("loss", "acc"))
        if self.trainer.sanity_checking:
            return
        self.last_reports[stage] = report
        self.history.append({"stage": stage, "step": int(self.global_step),
                             "epoch": int(self.current_epoch), **scalars})

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x)


class FreezeEarlyLayers(Callback):
    """Keep the stem, the embeddings and the first blocks fixed for the first epochs (or all).

    Frozen parameters stay in the optimizer but have their gradients dropped after each
    backward pass (AdamW then leaves them, and their weight decay, untouched), and the
    stem's BatchNorm statistics are not updated. Unlike ``requires_grad=False`` this works
    unchanged under DDP, whose gradient buckets are fixed when the model is wrapped.

    Args:
        epochs: epochs to keep them frozen (unfrozen at the start of epoch ``epochs``);
            None: the whole run (the transfer policy ``head`` also sets their
            ``requires_grad`` off, which this callback complements by keeping the stem's
            BatchNorm statistics fixed).
        blocks: leading transformer blocks frozen with the stem; None: half of them.
    """

    def __init__(self, epochs: int | None, blocks: int | None = None) -> None:
        self.epochs = epochs
        self.blocks = blocks
        self._announced = False

    def frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules held fixed: ``patch_embed`` and the first blocks (timm names)."""
        blocks = list(getattr(model, "blocks", []))
        n = len(blocks) // 2 if self.blocks is None else min(self.blocks, len(blocks))
        return [model.patch_embed, *blocks[:n]]

    def frozen_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = [p for m in self.frozen_modules(model) for p in m.parameters()]
        params += [getattr(model, n) for n in ("pos_embed", "cls_token")
                   if isinstance(getattr(model, n, None), nn.Parameter)]
        return params

    def _active(self, trainer: L.Trainer) -> bool:
        return self.epochs is None or trainer.current_epoch < self.epochs

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._active(trainer):
            # Lightning puts the whole model back in train mode after each validation.
            for m in self.frozen_modules(pl_module.model):
                for sub in m.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.eval()
        elif not self._announced and self.epochs:
            self._announced = True
            rank_zero_info(f"epoch {trainer.current_epoch}: unfreezing the stem and early blocks")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            for p in self.frozen_parameters(pl_module.model):
                p.grad = None
