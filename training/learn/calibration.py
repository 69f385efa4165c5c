"""Temperature scaling (Guo et al., 2017): one scalar T that makes softmax(logits / T) honest.

T is fitted on held-out logits (the validation split) by minimising the negative
log-likelihood over log T, so T stays positive; accuracy does not change, confidence does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# T is kept inside [1/20, 20]: beyond that the logits carry no usable signal, and a
# degenerate split (one class, all correct) would otherwise push T towards 0.
_LOG_T_BOUND = math.log(20.0)


def _nll(logits: torch.Tensor, targets: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits / log_t.exp(), targets)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, *, max_iter: int = 100) -> float:
    """Fit the temperature that minimises the NLL of ``targets`` under ``logits / T``.

    LBFGS on log T (strong-Wolfe line search), started at T = 1; a coarse 1-D grid search
    over log T is the fallback if LBFGS ends non-finite or worse than the grid.

    Args:
        logits: (N, C) raw model outputs on held-out data.
        targets: (N,) class indices.
        max_iter: LBFGS iterations.

    Returns:
        T > 0 as a float (1.0 when there is nothing to fit on).
    """
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.shape[0] == 0:
        return 1.0
    logits = logits.detach().double().cpu()
    targets = targets.detach().long().cpu()

    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _nll(logits, targets, log_t)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        candidate = log_t.detach().clamp(-_LOG_T_BOUND, _LOG_T_BOUND)
        grid = torch.linspace(-_LOG_T_BOUND, _LOG_T_BOUND, 241, dtype=torch.float64)
        grid_nll = torch.stack([_nll(logits, targets, g) for g in grid])
        best_grid = grid[int(grid_nll.argmin())]
        cand_nll = _nll(logits, targets, candidate)
        if not torch.isfinite(cand_nll) or cand_nll > grid_nll.min():
            candidate = best_grid
    return float(candidate.exp())
