"""Fine-tuning by transfer: how much of a base model to train, chosen from the data size.

When a run starts from a checkpoint (``TrainConfig.from_checkpoint``), :func:`plan_transfer`
picks one of three policies from the median number of *training* images per class (the
median, so that one thin or one huge class does not decide for all of them):

=========  ==========================  ===================================================
policy     training images per class   what trains
=========  ==========================  ===================================================
``head``   fewer than 50               the head, the final norm and the last block(s)
                                       (``max(1, depth // 4)``); the stem, embeddings and
                                       every earlier block stay frozen for the whole run,
                                       their BatchNorm statistics included; the trained
                                       blocks learn at ``BLOCK_LR_SCALE`` x the head's rate
``llrd``   50 to 499                   everything, with layer-wise learning-rate decay: the
                                       head at the full rate, each block below it at
                                       ``LAYER_DECAY`` x the one above, the stem lowest
``full``   500 or more                 everything at the same rate
=========  ==========================  ===================================================

A run from scratch has the policy ``scratch`` (nothing frozen, one rate). ``TrainConfig.
transfer`` may name a policy instead of ``auto``. The chosen policy and why are written to
the run's report, the checkpoint's metrics (``metrics["transfer"]``) and the printed summary.

The head: :func:`lungvit.training.learn.setup.adapt_model` gives a run whose labels differ from the
base's a new, freshly initialised head sized for its labels; the rows of labels the base
also has (matched by name) are copied from the base's head, so what the base knew of those
classes is the starting point, and the base's other labels are dropped. Frozen parameters
get ``requires_grad=False`` before training (no backward pass below the first trained
block, and DDP only registers what trains), which is stable for a resumed run: the policy
depends only on the configuration and the frozen split.

After training, the kept weights of a run from a checkpoint are moved part of the way back
to the base's (:func:`mix_with_base`, ``TrainConfig.base_mix``, 0.5 by default): a few scans
from one site pull a fine-tune towards that site's shortcuts, and the mix keeps more of what
the base learned elsewhere (``bench/bench_finetune.py`` measures both sides of the trade).
While it trains, a distillation term keeps its answers on its training images near the
base's (``TrainConfig.distill``, :class:`~lungvit.training.learn.module.LungViTModule`).
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lungvit.training.config import TrainConfig, TrainConfigError
from lungvit.training.learn.module import FreezeEarlyLayers

POLICIES = ("auto", "head", "llrd", "full")
SMALL_PER_CLASS = 50  # below: train the head and the last block(s) only
LARGE_PER_CLASS = 500  # from here: full fine-tuning
LAYER_DECAY = 0.75  # llrd: each block learns at this times the rate of the one above
BLOCK_LR_SCALE = 0.3  # head policy: the trained blocks' rate relative to the head's
_EMBEDDING_NAMES = ("cls_token", "pos_embed", "reg_token", "dist_token")


@dataclass(frozen=True)
class TransferPolicy:
    """How a run fine-tunes its base model.

    Attributes:
        name: ``scratch``, ``head``, ``llrd`` or ``full``.
        requested: what the configuration asked for (``auto`` or a policy name).
        per_class: median training images per class (what ``auto`` decided on).
        depth: transformer blocks of the model.
        frozen_blocks: leading blocks frozen for the whole run (with the stem and
            embeddings when ``freeze_stem``).
        freeze_stem: the stem (``patch_embed``), ``cls_token`` and ``pos_embed`` are frozen.
        layer_decay: learning-rate factor per block below the head (1.0: none).
        block_lr_scale: learning-rate factor of every trained block (``head`` policy).
        reason: one sentence saying why this policy was chosen.
    """

    name: str
    requested: str = "auto"
    per_class: float = 0.0
    depth: int = 0
    frozen_blocks: int = 0
    freeze_stem: bool = False
    layer_decay: float = 1.0
    block_lr_scale: float = 1.0
    reason: str = ""
    trained_blocks: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (report, checkpoint metrics)."""
        return asdict(self)

    def describe(self) -> str:
        """One line for the printed summary and the job's log."""
        if self.name == "scratch":
            return "transfer policy: none (trained from scratch)"
        what = {
            "head": (f"stem, embeddings and blocks 0-{self.frozen_blocks - 1} frozen for the "
                     f"whole run; block(s) {', '.join(map(str, self.trained_blocks))} at "
                     f"{self.block_lr_scale:g}x and the head at the full learning rate"),
            "llrd": (f"every layer trains, the learning rate falling by {self.layer_decay:g}x "
                     "per block from the head down to the stem"),
            "full": "every layer trains at the full learning rate",
        }[self.name]
        return f"transfer policy: {self.name} ({self.reason}): {what}"

    # ------------------------------------------------------------------ applying it
    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze what the policy holds fixed (``requires_grad=False``); returns ``model``."""
        for module in self.frozen_modules(model):
            for p in module.parameters():
                p.requires_grad_(False)
        if self.freeze_stem:
            for name in _EMBEDDING_NAMES:
                p = getattr(model, name, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)
        return model

    def frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        """The stem and the leading blocks frozen for the whole run (timm names)."""
        if not self.freeze_stem:
            return []
        return [model.patch_embed, *list(model.blocks)[:self.frozen_blocks]]

    def lr_scales(self, model: nn.Module) -> dict[str, float] | None:
        """Parameter name -> learning-rate factor (None: one rate for all)."""
        if self.layer_decay == 1.0 and self.block_lr_scale == 1.0:
            return None
        top = self.depth + 1  # the head and the final norm
        scales = {}
        for name, _ in model.named_parameters():
            layer = layer_id(name, self.depth)
            scale = self.layer_decay ** (top - layer)
            if layer < top:
                scale *= self.block_lr_scale
            scales[name] = scale
        return scales

    def callbacks(self) -> list[Callback]:
        """Callbacks the policy needs: keep the frozen stem's BatchNorm statistics fixed."""
        if not self.freeze_stem:
            return []
        return [FreezeEarlyLayers(None, self.frozen_blocks)]


def layer_id(name: str, depth: int) -> int:
    """Depth of a parameter: 0 stem and embeddings, i + 1 block i, depth + 1 norm and head."""
    if name.startswith("patch_embed.") or name in _EMBEDDING_NAMES:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def median_per_class(train_counts: Mapping[str, int]) -> float:
    """Median training images per class (0 for no classes)."""
    counts = [int(n) for n in train_counts.values()]
    return float(statistics.median(counts)) if counts else 0.0


def choose_policy(train_counts: Mapping[str, int], depth: int, *, requested: str = "auto",
                  from_checkpoint: bool = True) -> TransferPolicy:
    """The transfer policy of a run (see the module docstring).

    Args:
        train_counts: training images per class (the frozen split's).
        depth: transformer blocks of the model.
        requested: ``auto`` (decide from ``train_counts``) or a policy name.
        from_checkpoint: whether the run starts from a trained model (else ``scratch``).

    Returns:
        The :class:`TransferPolicy`.

    Raises:
        TrainConfigError: ``requested`` is not one of :data:`POLICIES`.
    """
    if requested not in POLICIES:
        raise TrainConfigError(f"transfer must be one of {', '.join(POLICIES)}, not "
                               f"{requested!r}")
    per_class = median_per_class(train_counts)
    common = {"requested": requested, "per_class": per_class, "depth": depth}
    if not from_checkpoint:
        return TransferPolicy("scratch", reason="no base model", **common)
    if requested != "auto":
        name, reason = requested, f"asked for; median {per_class:g} training images per class"
    elif per_class < SMALL_PER_CLASS:
        name = "head"
        reason = f"median {per_class:g} training images per class, fewer than {SMALL_PER_CLASS}"
    elif per_class < LARGE_PER_CLASS:
        name = "llrd"
        reason = (f"median {per_class:g} training images per class, {SMALL_PER_CLASS} to "
                  f"{LARGE_PER_CLASS - 1}")
    else:
        name = "full"
        reason = f"median {per_class:g} training images per class, {LARGE_PER_CLASS} or more"
    if name == "head":
        trained = max(1, depth // 4)
        frozen = max(0, depth - trained)
        return TransferPolicy(name, frozen_blocks=frozen, freeze_stem=True,
                              block_lr_scale=BLOCK_LR_SCALE, reason=reason,
                              trained_blocks=list(range(frozen, depth)), **common)
    if name == "llrd":
        return TransferPolicy(name, layer_decay=LAYER_DECAY, reason=reason,
                              trained_blocks=list(range(depth)), **common)
    return TransferPolicy(name, reason=reason, trained_blocks=list(range(depth)), **common)


def plan_transfer(cfg: TrainConfig, train_counts: Mapping[str, int],
                  model: nn.Module) -> TransferPolicy:
    """The policy of the run ``cfg`` on a split with ``train_counts``, for ``model``.

    Raises:
        TrainConfigError: ``cfg.transfer`` names no policy.
    """
    depth = len(getattr(model, "blocks", []))
    return choose_policy(train_counts, depth, requested=getattr(cfg, "transfer", "auto"),
                         from_checkpoint=cfg.from_checkpoint is not None)


def describe_run(transfer: Mapping[str, Any] | None,
                 comparison: Mapping[str, Any] | None) -> str:
    """The policy and the base-vs-tuned comparison of a finished run, for the summary."""
    from lungvit.training.learn.compare import describe_comparison

    lines = []
    if transfer:
        fields = {k: v for k, v in transfer.items() if k in TransferPolicy.__dataclass_fields__}
        line = TransferPolicy(**fields).describe()
        if transfer.get("distill"):
            line += (f"; answers kept near the base's on the training images (distillation "
                     f"weight {transfer['distill']:g})")
        if transfer.get("base_mix"):
            line += (f"; kept weights {transfer['base_mix']:g} x the base's + "
                     f"{1 - transfer['base_mix']:g} x the fine-tuned ones")
        lines.append(line)
    text = describe_comparison(dict(comparison) if comparison else None)
    if text:
        lines.append(text)
    return "\n".join(lines)


@torch.no_grad()
def mix_with_base(model: nn.Module, base_state: Mapping[str, torch.Tensor], share: float,
                  *, fresh_rows: Sequence[int] = ()) -> nn.Module:
    """Move a fine-tuned model's weights part of the way back to its base's, in place.

    Every floating-point parameter and buffer becomes ``share * base + (1 - share) *
    tuned`` (weight-space ensembling: a fine-tune on a few scans of one site keeps more of
    what the base learned elsewhere); integer buffers (BatchNorm's batch counts) stay as
    trained. Head rows in ``fresh_rows`` (labels the base did not have: their start was a
    random initialisation, not knowledge) stay as trained too.

    Args:
        model: the fine-tuned model (the same architecture as ``base_state``).
        base_state: its ``state_dict`` before training (after the head was adapted).
        share: the base's share, in [0, 1).
        fresh_rows: indices of head rows new to this run.

    Returns:
        ``model``.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the base's share must be in [0, 1), got {share}")
    fresh = torch.tensor(sorted(fresh_rows), dtype=torch.long)
    for name, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        base = base_state[name].to(value.device, value.dtype)
        mixed = torch.lerp(value, base, share)
        if name in ("head.weight", "head.bias") and len(fresh):
            mixed[fresh] = value[fresh]
        value.copy_(mixed)
    return model
