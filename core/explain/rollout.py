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
from functools import partial

import torch
from timm.layers import Attention
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


def _explicit_forward_applies(mod: nn.Module) -> bool:
    """Whether :func:`_explicit_attention` computes exactly what ``mod.forward`` does.

    True for timm's plain ``Attention`` (and subclasses that keep its ``forward``) without
    the output gate; anything else is captured through timm's own unfused path.
    """
    return (isinstance(mod, Attention) and type(mod).forward is Attention.forward
            and getattr(mod, "gate", None) is None and "forward" not in vars(mod))


# Heads per block of the explicit softmax when heads are fused on the fly: 4 x 257 x 257
# float32 weights (1 MB) stay in cache between q k^T, softmax, the fusion and attn @ v.
_HEAD_CHUNK = 4


@dataclass
class _Recorder:
    """Where a capture's explicit attention forwards put their weights."""

    cap: AttentionCapture
    owner: int
    head_fusion: str | None  # None: record each layer's full (B, H, N, N) weights

    def fuses_here(self, mod: nn.Module) -> bool:
        # Block-wise fusion writes into preallocated outputs, which autograd cannot follow;
        # with grad enabled the whole-tensor path runs and the hook fuses.
        return (self.head_fusion is not None and not mod.training and not torch.is_grad_enabled()
                and threading.get_ident() == self.owner)


def _explicit_attention(mod: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        is_causal: bool = False, *, recorder: _Recorder | None = None) -> torch.Tensor:
    """timm ``Attention.forward`` with explicit softmax weights.

    The same function as timm's unfused path, written so that it costs about what the fused
    (SDPA) path costs on CPU: the scale is folded into ``baddbmm`` on strided views of the
    qkv projection (no scaled copy of q, no copy of the transposed k). By default the
    weights pass through ``attn_drop``, where the capture's hook records them. When the
    capture fuses heads (``recorder.head_fusion``), heads are processed in blocks of
    ``_HEAD_CHUNK`` and fused as they go, so the full (H, N, N) weights never leave cache.
    On lungvit_ref64 (16 heads x 64 wide, 257 tokens, one thread) one layer took 4.3 ms
    this way against 6.5 ms for the whole-tensor softmax plus a head mean, 4.0 ms fused.
    """
    if attn_mask is not None or is_causal:  # not used by ViT classifiers; keep timm's path
        return Attention.forward(mod, x, attn_mask=attn_mask, is_causal=is_causal)
    b, n, _ = x.shape
    h, d = mod.num_heads, mod.head_dim
    qkv = mod.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D), a view
    q, k = mod.q_norm(qkv[0]), mod.k_norm(qkv[1])
    q, k, v = (t.reshape(b * h, n, d) for t in (q, k, qkv[2]))  # views when B == 1
    kt = k.transpose(1, 2)  # (B*H, D, N)
    if recorder is None or not recorder.fuses_here(mod):
        scores = torch.baddbmm(q.new_empty(b * h, n, n), q, kt, beta=0.0, alpha=mod.scale)
        attn = mod.attn_drop(scores.softmax(dim=-1).view(b, h, n, n))  # the hook reads its input
        out = torch.bmm(attn.view(b * h, n, n), v)  # (B*H, N, D)
    else:
        out = q.new_empty(b * h, n, d)
        fused = q.new_empty(b, 1, n, n)
        for i in range(b):
            for h0 in range(0, h, _HEAD_CHUNK):
                sl = slice(i * h + h0, i * h + min(h, h0 + _HEAD_CHUNK))
                a = torch.baddbmm(q.new_empty(sl.stop - sl.start, n, n), q[sl], kt[sl], beta=0.0,
                                  alpha=mod.scale).softmax(dim=-1)  # (c, N, N)
                torch.bmm(a, v[sl], out=out[sl])
                part = _fuse_block(a, recorder.head_fusion)
                fused[i, 0] = part if h0 == 0 else _combine(fused[i, 0], part, recorder.head_fusion)
        if recorder.head_fusion == "mean":
            fused /= h
        recorder.cap.attentions.append(fused)
    out = out.view(b, h, n, d).transpose(1, 2).reshape(b, n, h * d)
    return mod.proj_drop(mod.proj(mod.norm(out)))


def _fuse_block(a: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(c, N, N) -> (N, N): the sum (for a mean), max or min over a block of heads."""
    if head_fusion == "mean":
        return a.sum(dim=0)
    return a.amax(dim=0) if head_fusion == "max" else a.amin(dim=0)


def _combine(acc: torch.Tensor, part: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return acc + part
    return torch.maximum(acc, part) if head_fusion == "max" else torch.minimum(acc, part)


@contextlib.contextmanager
def capture_attention(model: nn.Module, *, head_fusion: str | None = None) -> Iterator[AttentionCapture]:
    """Record every block's attention weights during forward passes on this thread.

    For the duration of the block, each attention module of this instance computes its
    softmax weights explicitly: timm's plain ``Attention`` gets :func:`_explicit_attention`
    as an instance-level ``forward`` (the same function, about as fast as the fused path on
    CPU); any other attention module has its ``fused_attn`` flag switched off so that timm's
    own unfused path runs, and a hook on its ``attn_drop`` records the weights. Weights are
    recorded without detaching, so a caller running with grad enabled can differentiate
    through them (gradient-weighted rollout). Hooks are removed, forwards and flags restored
    in a ``finally``; only forward passes on the calling thread are recorded. A concurrent
    prediction on another thread meanwhile runs the same function, unrecorded.

    (Reading q and k from ``q_norm``/``k_norm`` hooks on the fused path and recomputing the
    softmax was measured too: it computes q k^T and the softmax twice, so it costs more.)

    Args:
        model: a timm VisionTransformer.
        head_fusion: None to record each layer's (B, H, N, N) weights; "mean", "max" or
            "min" to record only the (B, 1, N, N) fusion of the heads (what rollout needs),
            computed block by block in eval mode. Keeping every layer's full weights alive
            makes each layer allocate fresh memory (lungvit_ref64: 16 x 4.2 MB).

    Yields:
        An :class:`AttentionCapture` filled as forward passes run.
    """
    if head_fusion is not None and head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    mods = attention_modules(model)
    cap = AttentionCapture()
    rec = _Recorder(cap, threading.get_ident(), head_fusion)
    with model_lock(model):
        saved = [(m, m.fused_attn) for m in mods if hasattr(m, "fused_attn")]
        replaced: list[nn.Module] = []
        handles = []
        try:
            for m in mods:
                if _explicit_forward_applies(m):
                    m.forward = partial(_explicit_attention, m, recorder=rec)
                    replaced.append(m)
                elif hasattr(m, "fused_attn"):
                    m.fused_attn = False
                handles.append(m.attn_drop.register_forward_hook(_drop_hook(rec)))
            yield cap
        finally:
            for hd in handles:
                hd.remove()
            for m in replaced:
                del m.forward
            for m, flag in saved:
                m.fused_attn = flag


def _drop_hook(rec: _Recorder) -> Callable[..., None]:
    def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        # inputs[0] is the softmax before dropout: the weights the model used in eval
        # mode, and still the weights (not the dropped ones) in training mode. (An explicit
        # forward that fused the heads itself does not call attn_drop.)
        if threading.get_ident() == rec.owner:
            a = inputs[0]
            rec.cap.attentions.append(a if rec.head_fusion is None else fuse_heads(a, rec.head_fusion)[:, None])
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
