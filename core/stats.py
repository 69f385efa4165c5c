"""Small rank statistics shared by the explanation checks and the training metrics."""
from __future__ import annotations

import torch

__all__ = ["average_ranks"]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` (N,), tied values sharing the mean of their ranks.

    Args:
        x: a 1-D tensor.

    Returns:
        (N,) float64 ranks (as SciPy's ``rankdata(method="average")``).
    """
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    xs = x[order]
    # Group boundaries of equal values in sorted order.
    new_group = torch.ones_like(xs, dtype=torch.bool)
    new_group[1:] = xs[1:] != xs[:-1]
    group_id = torch.cumsum(new_group.long(), 0) - 1  # (N,)
    positions = torch.arange(1, len(x) + 1, dtype=torch.float64)
    sums = torch.zeros(int(group_id[-1]) + 1, dtype=torch.float64)
    sums.index_add_(0, group_id, positions)
    counts = torch.bincount(group_id).double()
    ranks = torch.empty_like(positions)
    ranks[order] = (sums / counts)[group_id]
    return ranks
