"""Setting up a run: the resolved configuration, the data module, the model to train.

:func:`resolve_config` fills in what a :class:`TrainConfig` leaves open (run folder,
variant, precision); :func:`build_datamodule` makes the data module of a resolved
configuration; :func:`build_training_model` makes the model, from scratch or from a
checkpoint, with :func:`adapt_model` giving it a new head when the labels differ. Used by
:func:`lungvit.training.learn.fit.fit`, and by the CLI and the job process to describe the
data before training.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from lungvit.core.model.checkpoint import load_checkpoint
from lungvit.core.model.network import DEFAULT_VARIANT, VARIANTS, build_model, create_model
from lungvit.core.model.preprocess import PreprocessConfig
from lungvit.core.model.reference import read_training_checkpoint
from lungvit.training.data.augment import augment_config
from lungvit.training.config import TrainConfig, TrainConfigError
from lungvit.training.data.discover import DatasetError
from lungvit.training.data.datamodule import ScanDataModule
from lungvit.training.store.paths import default_data_dir

log = logging.getLogger(__name__)


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``"auto"`` -> bf16-mixed on a GPU that supports it, 16-mixed on other GPUs, else 32-true."""
    if precision != "auto":
        return precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def default_run_dir(out: str | Path) -> Path:
    """``<data dir>/runs/<out name>/version_<n>`` with the first unused ``n``."""
    base = default_data_dir() / "runs" / Path(out).stem
    n = 0
    while (base / f"version_{n}").exists():
        n += 1
    return base / f"version_{n}"


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill in what depends on the model: variant, input size, run folder; validate.

    With ``from_checkpoint`` the variant and (unless given) the input size are the
    checkpoint's; resuming without a ``run_dir`` continues in the checkpoint's run folder.
    """
    cfg = replace(cfg).validate()
    if cfg.resume_from is not None:  # refused here, with LungViT's message, if unsafe
        read_training_checkpoint(cfg.resume_from)
    if cfg.from_checkpoint is not None:
        from lungvit.core.model.checkpoint import read_checkpoint_info

        info = read_checkpoint_info(cfg.from_checkpoint)
        if cfg.variant is not None and cfg.variant != info.variant:
            log.warning("--variant %s ignored: fine-tuning keeps the architecture of %s (%s)",
                        cfg.variant, Path(cfg.from_checkpoint).name, info.variant)
        cfg.variant = info.variant
        if cfg.input_size is None:
            cfg.input_size = info.preprocess.input_size if info.preprocess else info.model.img_size
    else:
        cfg.variant = cfg.variant or DEFAULT_VARIANT
        if cfg.variant not in VARIANTS:
            raise TrainConfigError(f"unknown variant {cfg.variant!r}; choose one of "
                                   f"{', '.join(VARIANTS)}")
        cfg.input_size = cfg.input_size or VARIANTS[cfg.variant].img_size
    if cfg.run_dir is None:
        ckpt_dir = Path(cfg.resume_from).resolve().parent if cfg.resume_from else None
        if ckpt_dir is not None and ckpt_dir.name == "checkpoints":
            cfg.run_dir = str(ckpt_dir.parent)
        else:
            cfg.run_dir = str(default_run_dir(cfg.out))
    if cfg.split_manifest is None:
        cfg.split_manifest = str(Path(cfg.run_dir) / "split.csv")
    return cfg


def _preprocess_for(cfg: TrainConfig) -> PreprocessConfig:
    if cfg.from_checkpoint is not None:
        from lungvit.core.model.checkpoint import read_checkpoint_info

        base = read_checkpoint_info(cfg.from_checkpoint).preprocess or PreprocessConfig()
        return replace(base, input_size=cfg.input_size)
    return PreprocessConfig(input_size=cfg.input_size)


def build_datamodule(cfg: TrainConfig, *,
                     progress: Callable[[int, int], None] | None = None) -> ScanDataModule:
    """The data module of a resolved config, prepared and set up (splits fixed).

    Raises:
        DatasetError: the folder cannot be trained on (no classes, too few images, ...).
    """
    augment = augment_config(cfg.augment_policy, **cfg.augment_options) if cfg.augment else None
    dm = ScanDataModule(cfg.data, preprocess=_preprocess_for(cfg), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, seed=cfg.seed, val_frac=cfg.val_frac,
                        test_frac=cfg.test_frac, augment=augment, cache_dir=cfg.cache_dir,
                        min_per_class=cfg.min_per_class, split_manifest=cfg.split_manifest,
                        balanced=cfg.balanced_sampling, progress=progress)
    dm.prepare_data()
    dm.setup("fit")
    empty = [s for s in ("train", "val", "test") if not dm.splits[s]]
    if empty:
        raise DatasetError(
            f"the {' and '.join(empty)} split(s) of {cfg.data} would be empty "
            f"({len(dm.samples)} usable images; split file {cfg.split_manifest}): add images, "
            "or start a new run folder if the split file belongs to other data")
    return dm


# ------------------------------------------------------------------------------ the model
def adapt_model(model: nn.Module, old_labels: Sequence[str], new_labels: Sequence[str], *,
                img_size: int | None = None) -> tuple[nn.Module, dict[str, list[str]]]:
    """A copy of ``model`` with a head for ``new_labels`` (and inputs of ``img_size``).

    The head is always a new one sized for ``new_labels`` with the fresh initialisation of
    :func:`lungvit.core.model.network.build_model`; the rows of labels both lists share are then
    copied from the old head by label name (what the base knew of those classes is the
    starting point), new labels keep their fresh rows, and old labels missing from
    ``new_labels`` are dropped. The same list in the same order keeps the head as it was.
    A new input size resamples the positional embedding over the new token grid.

    Returns:
        ``(model, mapping)`` with ``mapping`` = {"kept": [...], "new": [...], "dropped": [...]}.
    """
    old_cfg = model.lungvit_config
    new_cfg = replace(old_cfg, num_classes=len(new_labels), img_size=img_size or old_cfg.img_size)
    new = build_model(new_cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if new_cfg.grid_size != old_cfg.grid_size:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(new_cfg.grid_size),
            old_size=list(old_cfg.grid_size), num_prefix_tokens=1)
    old_index = {label: i for i, label in enumerate(old_labels)}
    weight, bias = new.head.weight.detach().clone(), new.head.bias.detach().clone()
    for i, label in enumerate(new_labels):
        if label in old_index:
            weight[i] = state["head.weight"][old_index[label]]
            bias[i] = state["head.bias"][old_index[label]]
    state["head.weight"], state["head.bias"] = weight, bias
    new.load_state_dict(state)
    mapping = {"kept": [x for x in new_labels if x in old_index],
               "new": [x for x in new_labels if x not in old_index],
               "dropped": [x for x in old_labels if x not in set(new_labels)]}
    return new, mapping


def build_training_model(cfg: TrainConfig, classes: Sequence[str]
                         ) -> tuple[nn.Module, dict[str, list[str]] | None]:
    """From scratch (``cfg.variant``) or from ``cfg.from_checkpoint`` with its head remapped."""
    if cfg.from_checkpoint is None:
        return create_model(cfg.variant, num_classes=len(classes), img_size=cfg.input_size), None
    base, info = load_checkpoint(cfg.from_checkpoint)
    model, mapping = adapt_model(base, info.labels, classes, img_size=cfg.input_size)
    return model.train(), mapping
