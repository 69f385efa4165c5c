"""``TrainConfig``: everything one training run needs, as a plain dataclass.

The CLI (``lungvit train``) and the Ray job launcher fill one in; :func:`lungvit.training.learn.fit.fit`
resolves it (defaults that depend on the data or the model) and saves the resolved copy
beside the run as ``config.yaml``, so a run can be repeated from its folder alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lungvit.core.configs import unknown_keys
from lungvit.core.errors import LungViTError

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "64-true")


class TrainConfigError(LungViTError, ValueError):
    """A training configuration that cannot run (the message says which setting and why)."""


@dataclass
class TrainConfig:
    """One training run.

    Args:
        data: folder of class folders (one sub-folder per label).
        out: path of the core-format checkpoint to write (``.safetensors``).
        variant: model variant (``lungvit.core.model.network.VARIANTS``); None: the default variant,
            or the variant of ``from_checkpoint``.
        from_checkpoint: fine-tune from this core checkpoint (head remapped by label name).
        input_size: model input side in pixels; None: the variant's (or checkpoint's).
        epochs: maximum epochs.
        max_steps: maximum optimizer steps (None: no limit beyond ``epochs``).
        batch_size: samples per device per forward pass.
        global_batch: samples per optimizer step over all devices; gradients are accumulated
            over ``ceil(global_batch / (batch_size * world_size))`` batches. None: no accumulation.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay (not applied to norms, biases, pos_embed, cls_token).
        warmup_steps: linear warm-up steps; None: ``warmup_frac`` of the total steps.
        warmup_frac: warm-up as a fraction of the total optimizer steps.
        min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio``.
        label_smoothing: cross-entropy label smoothing.
        class_weighting: weight the loss by inverse class frequency of the training split.
        grad_checkpointing: recompute block activations in backward (less memory, slower).
        precision: Lightning precision; "auto": bf16-mixed on GPUs that support it,
            else 16-mixed on GPU, 32-true on CPU.
        val_every_n_steps: validate every N optimizer steps; None: once per epoch.
        checkpoint_every_n_steps: write a resumable Lightning checkpoint every N optimizer
            steps; None: after each validation.
        keep_best_k: resumable checkpoints kept by validation loss (plus the last one).
        early_stopping_patience: stop after this many evaluations without a lower val loss
            (0 turns early stopping off).
        freeze_stem_epochs: keep the conv stem, embeddings and the first ``freeze_blocks``
            blocks frozen for this many epochs (useful with ``from_checkpoint``).
        freeze_blocks: blocks frozen with the stem; None: half of them.
        seed: seeds weights, splits, augmentation and shuffling.
        num_workers: dataloader worker processes per device.
        devices: Lightning ``devices`` ("auto", a count, or a list of indices).
        accelerator: Lightning accelerator ("auto", "cpu", "gpu", ...).
        run_dir: folder for resumable checkpoints, logs, the split manifest and the resolved
            config; None: ``<out folder>/runs/<out name>/version_<n>``.
        resume_from: a Lightning ``.ckpt`` of an earlier run to continue (step count,
            optimizer and learning-rate schedule included).
        augment: augment training images.
        augment_policy: named augmentation policy (``lungvit.training.data.augment.PRESETS``):
            "basic" (small affine, brightness, contrast) or "acquisition" (also crops,
            aspect, gamma, blur, noise, resampling, JPEG and borders: other scanners/sites).
        augment_options: keyword arguments of ``AugmentConfig`` overriding the policy's.
        citations: the training data's citations, stored in the checkpoint and its card.
        balanced_sampling: draw training batches class-balanced (and, within a class,
            source-balanced where sources are known), with replacement.
        val_frac: fraction of each class held out for validation.
        test_frac: fraction of each class held out for the final test.
        min_per_class: classes with fewer readable images are left out (and reported).
        split_manifest: reuse the split written by an earlier run (its ``split.json``).
        cache_dir: where decoded, resized images are cached (None: no cache).
        fast_dev_run: run one batch (or N) of train/val/test as a smoke test.
        notes: free text stored in the checkpoint (what it is, caveats); the measured
            test accuracy is appended.
        intended_use: the checkpoint's intended-use statement (None: a generic
            research-only statement).
        transfer: with ``from_checkpoint``, how much of the base model trains: "auto"
            (chosen from the training images per class), "head", "llrd" or "full"
            (``lungvit.training.learn.transfer``).
        compare_to: the model the result is compared with on the test split; None: the
            ``from_checkpoint`` model (no comparison when both are None).
        base_mix: with ``from_checkpoint``, the share of the base model's weights in the
            result: the kept weights become ``base_mix * base + (1 - base_mix) * tuned``
            (weight-space ensembling; 0: the fine-tuned weights alone). Head rows of labels
            the base lacks stay as trained. The default 0.5 was fixed before measuring (the
            usual middle of WiSE-FT, Wortsman et al., CVPR 2022), not tuned on any split;
            ``bench/bench_finetune.py`` measures what it does.
        distill: with ``from_checkpoint``, the weight of a distillation term that keeps
            the fine-tune's answers on its own training images close to the base's over
            the classes both know (Learning without Forgetting, Li & Hoiem, ECCV 2016; KL
            divergence at temperature ``distill_temperature``, scaled by its square);
            0: off. The weight 1 and temperature 2 are that paper's, fixed before
            measuring; switching it on by default was decided after
            ``bench/bench_finetune.py`` (two seeds) showed it cut the loss on a held-out
            source from 32 and 13 points to 9 and 4 (BENCHMARKS.md).
        distill_temperature: see ``distill`` (2, as in that paper).
    """

    data: str
    out: str
    variant: str | None = None
    from_checkpoint: str | None = None
    input_size: int | None = None
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    global_batch: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.0
    class_weighting: bool = False
    grad_checkpointing: bool = False
    precision: str = "auto"
    val_every_n_steps: int | None = None
    checkpoint_every_n_steps: int | None = None
    keep_best_k: int = 3
    early_stopping_patience: int = 5
    freeze_stem_epochs: int = 0
    freeze_blocks: int | None = None
    seed: int = 0
    num_workers: int = 0
    devices: int | str | list[int] = "auto"
    accelerator: str = "auto"
    run_dir: str | None = None
    resume_from: str | None = None
    augment: bool = True
    augment_options: dict[str, Any] = field(default_factory=dict)
    augment_policy: str = "basic"
    citations: list[str] = field(default_factory=list)
    balanced_sampling: bool = False
    val_frac: float = 0.15
    test_frac: float = 0.15
    min_per_class: int = 5
    split_manifest: str | None = None
    cache_dir: str | None = None
    fast_dev_run: bool | int = False
    notes: str | None = None
    intended_use: str | None = None
    transfer: str = "auto"
    compare_to: str | None = None
    base_mix: float = 0.5
    distill: float = 1.0
    distill_temperature: float = 2.0

    def __post_init__(self) -> None:
        self.data = str(self.data)
        self.out = str(self.out)
        for name in ("from_checkpoint", "run_dir", "resume_from", "split_manifest", "cache_dir"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(value))

    def validate(self) -> TrainConfig:
        """Raise :class:`TrainConfigError` naming every setting that cannot work; return self."""
        problems = []

        def positive(name: str, allow_none: bool = True) -> None:
            value = getattr(self, name)
            if (value is None and not allow_none) or (value is not None and value < 1):
                problems.append(f"{name} must be a positive integer, not {value!r}")

        for name in ("epochs", "batch_size"):
            positive(name, allow_none=False)
        for name in ("max_steps", "global_batch", "input_size", "val_every_n_steps",
                     "checkpoint_every_n_steps"):
            positive(name)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, not {self.lr!r}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, not {self.weight_decay!r}")
        if not 0 <= self.base_mix < 1:
            problems.append(f"base_mix must be in [0, 1), not {self.base_mix!r}")
        if not (self.distill >= 0 and math.isfinite(self.distill)):
            problems.append(f"distill must be a number >= 0, not {self.distill!r}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            problems.append(f"distill_temperature must be > 0, not {self.distill_temperature!r}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), not {self.label_smoothing!r}")
        if not 0 <= self.warmup_frac < 1:
            problems.append(f"warmup_frac must be in [0, 1), not {self.warmup_frac!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], not {self.min_lr_ratio!r}")
        for name in ("warmup_steps", "freeze_blocks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must be >= 0, not {value!r}")
        for name in ("keep_best_k", "early_stopping_patience", "freeze_stem_epochs",
                     "num_workers", "min_per_class"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, not {getattr(self, name)!r}")
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1
                and self.val_frac + self.test_frac < 1):
            problems.append(f"val_frac ({self.val_frac}) and test_frac ({self.test_frac}) must be "
                            "in (0, 1) and leave data to train on")
        from lungvit.training.data.augment import PRESETS

        if self.augment_policy not in PRESETS:
            problems.append(f"augment_policy must be one of {', '.join(PRESETS)}, "
                            f"not {self.augment_policy!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, "
                            f"not {self.precision!r}")
        if self.resume_from is not None and not Path(self.resume_from).is_file():
            problems.append(f"resume_from: no checkpoint at {self.resume_from}")
        if self.from_checkpoint is not None and not Path(self.from_checkpoint).is_file():
            problems.append(f"from_checkpoint: no model file at {self.from_checkpoint}")
        if problems:
            raise TrainConfigError("invalid training configuration: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild a config; unknown keys are an error rather than silently ignored."""
        unknown = unknown_keys(cls, data)
        if unknown:
            raise TrainConfigError(f"unknown training configuration keys: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the config as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a config written by :meth:`save`."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path} does not hold a training configuration")
        return cls.from_dict(data)
