"""AdamW parameter groups, without Lightning (shared by the Lightning module and the benchmarks)."""
from __future__ import annotations

from typing import Any

from torch import nn

# Parameters named here (besides every 1-D tensor: norms and biases) get no weight decay.
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "reg_token", "dist_token"})


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices, none on norms, biases and embeddings.

    Args:
        model: the model to optimise.
        weight_decay: decay of the weight matrices.

    Returns:
        Two AdamW parameter groups (decayed, not decayed) covering every parameter once.
    """
    no_decay_names = set(NO_DECAY_NAMES)
    if hasattr(model, "no_weight_decay"):  # timm's own list
        no_decay_names |= set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias") or name in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
