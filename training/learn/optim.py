"""AdamW parameter groups, without Lightning (shared by the Lightning module and the benchmarks)."""
from __future__ import annotations

from typing import Any

from timm.optim import param_groups_weight_decay
from torch import nn

# Parameters named here (besides every 1-D tensor: norms and biases) get no weight decay.
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "reg_token", "dist_token"})


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices, none on norms, biases and embeddings.

    The split is timm's :func:`~timm.optim.param_groups_weight_decay` (1-D tensors, biases
    and the listed names undecayed), with :data:`NO_DECAY_NAMES` and the model's own
    ``no_weight_decay()`` as the list.

    Args:
        model: the model to optimise.
        weight_decay: decay of the weight matrices.

    Returns:
        Two AdamW parameter groups (decayed, not decayed), in that order and both present
        even when empty, covering every parameter that requires a gradient once.
    """
    no_decay_names = set(NO_DECAY_NAMES)
    if hasattr(model, "no_weight_decay"):  # timm's own list
        no_decay_names |= set(model.no_weight_decay())
    # timm drops an empty group, orders (no decay, decay), and with weight_decay 0 puts
    # everything in one group; a marker decay keeps the split (and so the order of the
    # parameters, which a resumed optimizer state relies on) the same for every value.
    groups = param_groups_weight_decay(model, weight_decay=1.0,
                                       no_weight_decay_list=no_decay_names)
    decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
    no_decay = [p for g in groups if not g["weight_decay"] for p in g["params"]]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
