"""Attention rollout: pure math on attention tensors, plus the capture that feeds it.

The math (:func:`fuse_heads`, :func:`augment`, :func:`rollout`) works on plain tensors and
knows nothing about models. :func:`capture_attention` is the thin adapter: a context manager
that switches fused attention off *on the given instance only*, hooks each block's
``attn.attn_drop`` (where timm's unfused path passes the softmax weights), and always
restores the flag and removes the hooks, even when the forward pass raises.

Concurrency. The served model is shared with prediction threads. Two things could go wrong:

* Hooks on a shared instance fire for *every* thread's forward pass. Each capture therefore
  records only calls made on the thread that opened it (``threading.get_ident()``), so a
  concurrent ``predict`` never lands in an explanation.
* Toggling ``fused_attn`` is harmless for concurrent predictions (both attention paths give
  the same numbers, only the speed differs), but two overlapping captures would restore the
  flag under each other. Captures of one model are serialised by a per-model lock, kept in a
  ``WeakKeyDictionary`` so it never keeps a model alive; no results are stored globally.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

HEAD_FUSIONS = ("mean", "max", "min")

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises hook-based captures on ``model``."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = threading.RLock()
            _LOCKS[model] = lock
        return lock


# ----------------------------------------------------------------------------- pure math


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Fuse the heads of one layer's attention.

    Args:
        attention: (B, H, N, N) attention weights (rows sum to 1).
        head_fusion: "mean", "max" or "min" over heads.

    Returns:
        (B, N, N).
    """
    if attention.ndim != 4:
        raise ValueError(f"expected (B, H, N, N) attention, got shape {tuple(attention.shape)}")
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def discard_lowest(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the ``discard_ratio`` fraction of smallest entries of each (N, N) matrix.

    The diagonal is never discarded (it carries the residual path), so every row keeps
    mass and the later row normalisation stays defined.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if discard_ratio == 0.0:
        return fused
    b, n, _ = fused.shape
    flat = fused.reshape(b, n * n)
    k = int(n * n * discard_ratio)
    if k == 0:
        return fused
    # Rank off-diagonal entries only: the diagonal is pushed to +inf before picking.
    eye = torch.eye(n, dtype=torch.bool, device=fused.device).reshape(n * n)
    scores = flat.masked_fill(eye, float("inf"))
    k = min(k, n * n - n)
    idx = scores.topk(k, dim=-1, largest=False).indices  # (B, k)
    out = flat.clone()
    out.scatter_(1, idx, 0.0)
    return out.reshape(b, n, n)


def augment(fused: torch.Tensor) -> torch.Tensor:
    """Add the residual identity and normalise rows: ``(A + I) / rowsum(A + I)``.

    Args:
        fused: (B, N, N) non-negative head-fused attention.

    Returns:
        (B, N, N) row-stochastic matrix.
    """
    n = fused.shape[-1]
    a = fused + torch.eye(n, dtype=fused.dtype, device=fused.device)
    # keepdim: divide each *row* by its own sum (dividing by a (N,) vector broadcasts
    # over the last axis and normalises columns instead, a classic rollout bug).
    return a / a.sum(dim=-1, keepdim=True)


def rollout_matrix(
    attentions: Sequence[torch.Tensor],
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """The rolled-out token-to-token matrix ``A_L ... A_2 A_1`` of augmented layers.

    Each layer's heads are fused, the lowest entries optionally discarded, the residual
    identity added and rows normalised (:func:`augment`); the product of row-stochastic
    matrices is row-stochastic.

    Args:
        attentions: per layer, (B, H, N, N) attention weights, first layer first.

    Returns:
        (B, N, N).
    """
    if not attentions:
        raise ValueError("rollout needs at least one layer of attention")
    joint: torch.Tensor | None = None
    for att in attentions:
        a = augment(discard_lowest(fuse_heads(att.float(), head_fusion), discard_ratio))  # (B, N, N)
        joint = a if joint is None else a @ joint
    assert joint is not None
    return joint


def rollout(
    attentions: Sequence[torch.Tensor],
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    num_prefix_tokens: int = 1,
    grid: tuple[int, int],
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) read as a map over the patch grid.

    The map is the [CLS] row of :func:`rollout_matrix` at the patch tokens (prefix tokens
    skipped); a model without prefix tokens averages all rows. (The row is computed as a
    vector-matrix chain, never forming the full product.)

    Args:
        attentions: per layer, (B, H, N, N) attention weights, first layer first.
        head_fusion: "mean", "max" or "min".
        discard_ratio: fraction of lowest off-diagonal entries zeroed per layer.
        num_prefix_tokens: tokens before the patch tokens ([CLS], registers).
        grid: (h, w) patch grid; ``h * w`` must equal ``N - num_prefix_tokens``.

    Returns:
        (B, h, w) non-negative map.
    """
    if not attentions:
        raise ValueError("rollout needs at least one layer of attention")
    h, w = grid
    n = attentions[0].shape[-1]
    if h * w != n - num_prefix_tokens:
        raise ValueError(f"grid {grid} does not match {n} tokens with {num_prefix_tokens} prefix tokens")
    b = attentions[0].shape[0]
    # Only one row of the product is read, so multiply a row vector through the layers from
    # the last one down: e0^T A_L ... A_1 costs O(L N^2) instead of O(L N^3).
    if num_prefix_tokens > 0:
        row = torch.zeros(b, 1, n, device=attentions[0].device)
        row[:, 0, 0] = 1.0  # [CLS]
    else:
        row = torch.full((b, 1, n), 1.0 / n, device=attentions[0].device)  # mean of all rows
    for att in reversed(attentions):
        a = discard_lowest(fuse_heads(att.float(), head_fusion), discard_ratio)  # (B, N, N)
        # row @ augment(a) without forming A + I: row @ D^-1 (A + I) = r @ A + r, where
        # r = row / rowsum(A + I) (entrywise; the rows' sums, as in augment()).
        r = row / (a.sum(dim=-1) + 1.0).unsqueeze(1)  # (B, 1, N)
        row = torch.baddbmm(r, r, a)  # (B, 1, N)
    return row[:, 0, num_prefix_tokens:].reshape(b, h, w)


def grad_weighted(attention: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Class-specific attention of one layer: ``mean_heads(A * relu(dA))`` as (B, 1, N, N)."""
    return (attention * grad.clamp(min=0)).mean(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- capture


def grid_shape(model: nn.Module) -> tuple[int, int]:
    """The patch grid (h, w) from the model's embedding layer."""
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if grid is None:
        raise ValueError("the model's embedding layer does not report a grid_size; "
                         "attention maps need a timm VisionTransformer-style patch_embed")
    return int(grid[0]), int(grid[1])


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each block's attention module (one with ``attn_drop`` and ``fused_attn``), in order."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("the model has no `blocks`; attention capture needs a timm VisionTransformer")
    mods = [blk.attn for blk in blocks if hasattr(getattr(blk, "attn", None), "attn_drop")]
    if not mods:
        raise ValueError("no block exposes `attn.attn_drop`; cannot capture attention weights")
    return mods


@dataclass
class AttentionCapture:
    """What one capture recorded: per layer, the (B, H, N, N) softmax weights (or their
    (B, 1, N, N) head fusion)."""

    attentions: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def capture_attention(model: nn.Module, *, head_fusion: str | None = None) -> Iterator[AttentionCapture]:
    """Record every block's attention weights during forward passes on this thread.

    For the duration of the block, each attention module of this instance that has timm's
    ``fused_attn`` switch has it turned off, so that timm's own unfused path runs and passes
    the softmax weights through ``attn_drop``, where a forward hook records them (modules
    without the switch are hooked as they are). Weights are recorded without detaching, so a
    caller running with grad enabled can differentiate through them (gradient-weighted
    rollout). Hooks are removed and flags restored in a ``finally``; only forward passes on
    the calling thread are recorded. A concurrent prediction on another thread meanwhile
    runs the unfused path too (the same numbers, only slower), unrecorded.

    (Reading q and k from ``q_norm``/``k_norm`` hooks on the fused path and recomputing the
    softmax was measured too: it computes q k^T and the softmax twice, so it costs more; and
    its weights are not in the graph of the logits, so gradient rollout could not use them.)

    Args:
        model: a timm VisionTransformer.
        head_fusion: None to record each layer's (B, H, N, N) weights; "mean", "max" or
            "min" to record only the (B, 1, N, N) fusion of the heads (what rollout needs),
            fused as each layer runs. Keeping every layer's full weights alive makes each
            layer allocate fresh memory (lungvit_ref64: 16 x 4.2 MB).

    Yields:
        An :class:`AttentionCapture` filled as forward passes run.
    """
    if head_fusion is not None and head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    mods = attention_modules(model)
    cap = AttentionCapture()
    hook = _drop_hook(cap, threading.get_ident(), head_fusion)
    with model_lock(model):
        saved = [(m, m.fused_attn) for m in mods if hasattr(m, "fused_attn")]
        handles = []
        try:
            for m, _ in saved:
                m.fused_attn = False
            for m in mods:
                handles.append(m.attn_drop.register_forward_hook(hook))
            yield cap
        finally:
            for hd in handles:
                hd.remove()
            for m, flag in saved:
                m.fused_attn = flag


def _drop_hook(cap: AttentionCapture, owner: int, head_fusion: str | None) -> Callable[..., None]:
    def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        # inputs[0] is the softmax before dropout: the weights the model used in eval
        # mode, and still the weights (not the dropped ones) in training mode.
        if threading.get_ident() == owner:
            a = inputs[0]  # (B, H, N, N)
            cap.attentions.append(a if head_fusion is None else fuse_heads(a, head_fusion)[:, None])
    return hook


def attention_rollout(
    model: nn.Module,
    x: torch.Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention rollout of ``model`` on ``x``, from one forward pass.

    Args:
        model: a timm VisionTransformer in eval mode.
        x: (B, C, S, S) model input.

    Returns:
        ((B, h, w) rollout map, (B, K) logits).
    """
    grid = grid_shape(model)
    npt = int(getattr(model, "num_prefix_tokens", 1))
    # Heads are fused as each layer runs; the (B, 1, N, N) result is what rollout would
    # compute from the full weights (any fusion of one head is that head).
    with torch.no_grad(), capture_attention(model, head_fusion=head_fusion) as cap:
        logits = model(x)
    _check_layers(cap, model)
    return rollout(cap.attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                   num_prefix_tokens=npt, grid=grid), logits


def gradient_rollout(
    model: nn.Module,
    x: torch.Tensor,
    target: int | Sequence[int],
    *,
    discard_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-specific rollout: each layer's attention weighted by ``relu(d logit / dA)``.

    Args:
        model: a timm VisionTransformer in eval mode.
        x: (B, C, S, S) model input.
        target: class index (or one per sample) whose logit is differentiated.

    Returns:
        ((B, h, w) map, (B, K) logits).
    """
    grid = grid_shape(model)
    npt = int(getattr(model, "num_prefix_tokens", 1))
    with torch.enable_grad(), capture_attention(model) as cap:
        logits = model(x)
        _check_layers(cap, model)
        tgt = torch.as_tensor(target, device=logits.device).reshape(-1).expand(logits.shape[0])
        score = logits.gather(1, tgt[:, None]).sum()
        # autograd.grad, not backward(): no .grad is written on the shared model's parameters.
        grads = torch.autograd.grad(score, cap.attentions)
    weighted = [grad_weighted(a.detach(), g) for a, g in zip(cap.attentions, grads)]
    return rollout(weighted, head_fusion="mean", discard_ratio=discard_ratio,
                   num_prefix_tokens=npt, grid=grid), logits.detach()


def _check_layers(cap: AttentionCapture, model: nn.Module) -> None:
    expected = len(attention_modules(model))
    if len(cap.attentions) != expected:
        raise RuntimeError(f"captured {len(cap.attentions)} attention maps from {expected} blocks; "
                           "the model's attention does not pass its weights through attn_drop")
