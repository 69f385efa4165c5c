"""Attention rollout: the pure math against a plain reference, and the capture adapter."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lungvit.core.explain.rollout import (
    attention_rollout,
    augment,
    capture_attention,
    discard_lowest,
    fuse_heads,
    gradient_rollout,
    grid_shape,
    rollout,
    rollout_matrix,
)
from lungvit.core.model.network import create_model

from .conftest import small_vit


def random_attention(b: int, h: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, n, n, generator=g) * 3, dim=-1)


def reference_rollout(layers: list[np.ndarray], fusion: str, prefix: int) -> np.ndarray:
    """Rollout written the slow, obvious way: loops, numpy, one sample."""
    n = layers[0].shape[-1]
    joint = np.eye(n)
    for a in layers:  # a: (H, N, N)
        fused = {"mean": a.mean(0), "max": a.max(0), "min": a.min(0)}[fusion]
        aug = fused + np.eye(n)
        for i in range(n):
            aug[i] = aug[i] / aug[i].sum()
        joint = aug @ joint
    return joint[0, prefix:]


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5, 0.95])
def test_rows_sum_to_one_per_layer_and_in_the_product(fusion: str, discard: float) -> None:
    layers = [random_attention(2, 4, 17, seed) for seed in range(5)]
    for att in layers:
        aug = augment(discard_lowest(fuse_heads(att, fusion), discard))
        torch.testing.assert_close(aug.sum(-1), torch.ones(2, 17))
        assert (aug >= 0).all()
    joint = rollout_matrix(layers, head_fusion=fusion, discard_ratio=discard)
    torch.testing.assert_close(joint.sum(-1), torch.ones(2, 17))
    # The [CLS] row, prefix included, is a distribution over input tokens.
    m = rollout(layers, head_fusion=fusion, discard_ratio=discard, num_prefix_tokens=1, grid=(4, 4))
    assert m.shape == (2, 4, 4)
    torch.testing.assert_close(m.sum((1, 2)) + joint[:, 0, 0], torch.ones(2))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("prefix", [1, 2])
def test_matches_a_plain_reference(fusion: str, prefix: int) -> None:
    n = 9 + prefix
    layers = [random_attention(1, 3, n, seed) for seed in range(4)]
    got = rollout(layers, head_fusion=fusion, num_prefix_tokens=prefix, grid=(3, 3))[0].reshape(-1)
    want = reference_rollout([a[0].numpy().astype(np.float64) for a in layers], fusion, prefix)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_a_model_without_prefix_tokens_averages_all_rows() -> None:
    layers = [random_attention(2, 3, 16, seed) for seed in range(3)]
    got = rollout(layers, num_prefix_tokens=0, grid=(4, 4))
    want = rollout_matrix(layers).mean(dim=1).reshape(2, 4, 4)
    torch.testing.assert_close(got, want)


def test_uniform_attention_gives_the_closed_form() -> None:
    n = 17
    uniform = torch.full((1, 2, n, n), 1.0 / n)
    m = rollout([uniform], num_prefix_tokens=1, grid=(4, 4))
    # (U + I) / 2: the [CLS] row puts 1 / (2N) on every patch token.
    torch.testing.assert_close(m, torch.full((1, 4, 4), 1.0 / (2 * n)))


def test_rows_not_columns_are_normalised() -> None:
    """A matrix whose rows and columns sum differently exposes column normalisation."""
    a = torch.tensor([[[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.0, 0.2, 0.8]]])
    aug = augment(a)
    want = (a + torch.eye(3)) / (a + torch.eye(3)).sum(-1, keepdim=True)
    torch.testing.assert_close(aug, want)


def test_discard_keeps_the_diagonal_and_zeroes_the_lowest() -> None:
    fused = fuse_heads(random_attention(1, 2, 10, 3))
    out = discard_lowest(fused, 0.5)
    off = ~torch.eye(10, dtype=torch.bool)
    assert int((out[0][off] == 0).sum()) == 50
    torch.testing.assert_close(out[0].diagonal(), fused[0].diagonal())
    kept = out[0][off][out[0][off] > 0]
    dropped = fused[0][off][out[0][off] == 0]
    assert kept.min() >= dropped.max()
    with pytest.raises(ValueError):
        discard_lowest(fused, 1.0)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="grid"):
        rollout([random_attention(1, 2, 17, 0)], grid=(3, 3))
    with pytest.raises(ValueError, match="head_fusion"):
        fuse_heads(random_attention(1, 2, 5, 0), "median")
    with pytest.raises(ValueError):
        rollout([], grid=(1, 1))


def manual_attentions(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's softmax(q k^T / sqrt(d)) recomputed from the weights, independently of hooks."""
    out = []
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks:
            a = blk.attn
            y = blk.norm1(t)
            b, n, _ = y.shape
            qkv = a.qkv(y).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
            out.append(torch.softmax(q @ k.transpose(-2, -1) * a.scale, dim=-1))
            t = blk(t)
    return out


@pytest.mark.parametrize("builder", ["timm", "lungvit"])
def test_capture_records_the_real_attention_and_restores_fused(builder: str, tiny_lungvit) -> None:
    model = small_vit() if builder == "timm" else tiny_lungvit
    for blk in model.blocks:
        blk.attn.fused_attn = True
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        fused_logits = model(x)
    with capture_attention(model) as cap:
        # Every block runs an explicit softmax: the capture's own forward, or timm's unfused path.
        assert all("forward" in vars(blk.attn) or not blk.attn.fused_attn for blk in model.blocks)
        with torch.no_grad():
            logits = model(x)
    assert all(blk.attn.fused_attn for blk in model.blocks)
    assert all("forward" not in vars(blk.attn) for blk in model.blocks)
    torch.testing.assert_close(logits, fused_logits, rtol=1e-4, atol=1e-5)
    want = manual_attentions(model, x)
    assert len(cap.attentions) == len(want)
    for got, exp in zip(cap.attentions, want):
        assert got.shape == exp.shape
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_capture_can_fuse_heads_on_the_fly(fusion: str) -> None:
    model = small_vit(num_heads=8)  # two blocks of heads per layer
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        fused_logits = model(x)
        with capture_attention(model) as full:
            model(x)
        with capture_attention(model, head_fusion=fusion) as cap:
            logits = model(x)
    torch.testing.assert_close(logits, fused_logits, rtol=1e-4, atol=1e-5)
    assert len(cap.attentions) == len(full.attentions) == 3
    for got, a in zip(cap.attentions, full.attentions):
        assert got.shape == (2, 1, 65, 65)
        torch.testing.assert_close(got[:, 0], fuse_heads(a, fusion), rtol=1e-5, atol=1e-7)
    with capture_attention(model, head_fusion=fusion) as graded:  # grad on: the hook fuses
        model(x)
    torch.testing.assert_close(graded.attentions[0], cap.attentions[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError), capture_attention(model, head_fusion="median"):
        pass


def test_gated_attention_is_captured_through_timms_unfused_path_like_the_rest() -> None:
    model = small_vit()
    gated = model.blocks[1].attn
    gated.gate = torch.nn.Linear(gated.qkv.in_features, gated.attn_dim)  # timm's gated attention
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        fused_logits = model(x)
    with capture_attention(model) as cap:
        # No forward is replaced: every block, gated or not, runs timm's own unfused path.
        assert all("forward" not in vars(blk.attn) and not blk.attn.fused_attn for blk in model.blocks)
        with torch.no_grad():
            logits = model(x)
    assert gated.fused_attn and len(cap.attentions) == 3
    torch.testing.assert_close(logits, fused_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cap.attentions[1].sum(-1), torch.ones(1, 4, 65))


def test_captured_weights_reproduce_timms_attention_output() -> None:
    """Guard against a timm upgrade: the capture relies on timm's ``fused_attn`` switch and on
    its unfused path passing the softmax weights (B, H, N, N) through ``attn_drop``.

    If either changes, the weights recorded at ``attn_drop``, multiplied by v and projected,
    no longer give the block's attention output (or nothing is recorded at all)."""
    torch.manual_seed(0)
    model = create_model("lungvit_tiny").eval()  # 64 px: 16 x 16 tokens + [CLS], 4 heads
    with torch.no_grad():  # sharper q, k than at init, so the weights are far from uniform
        for blk in model.blocks:
            torch.nn.init.normal_(blk.attn.qkv.weight, std=0.5)
            blk.attn.fused_attn = True
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        plain_logits = model(x)
    inputs: list[torch.Tensor] = []
    pre = [blk.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for blk in model.blocks]
    try:
        with torch.no_grad(), capture_attention(model) as cap:
            logits = model(x)
    finally:
        for h in pre:
            h.remove()
    assert all(blk.attn.fused_attn for blk in model.blocks)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-6)
    assert len(cap.attentions) == len(inputs) == len(model.blocks)
    n = 16 * 16 + 1
    for blk, att, y in zip(model.blocks, cap.attentions, inputs):
        a = blk.attn
        b = y.shape[0]
        assert att.shape == (b, a.num_heads, n, n)
        torch.testing.assert_close(att.sum(-1), torch.ones(b, a.num_heads, n), rtol=0, atol=1e-5)
        assert (att >= 0).all() and float(att.amax(-1).mean()) > 10 / n  # not near-uniform
        with torch.no_grad():
            v = a.qkv(y).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)[2]  # (B, H, N, D)
            ours = a.proj(a.norm((att @ v).transpose(1, 2).reshape(b, n, a.attn_dim)))  # (B, N, C)
            for fused in (True, False):
                a.fused_attn = fused
                torch.testing.assert_close(ours, a(y), rtol=1e-5, atol=1e-6)
            a.fused_attn = True


def test_capture_restores_an_unfused_setting_too() -> None:
    model = small_vit()
    model.blocks[1].attn.fused_attn = False
    with capture_attention(model):
        pass
    assert [b.attn.fused_attn for b in model.blocks] == [True, False, True]


def test_hooks_removed_and_flag_restored_when_the_forward_raises() -> None:
    model = small_vit()

    class Boom(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model.head = Boom()
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model):
        model(torch.randn(1, 1, 32, 32))
    assert all(blk.attn.fused_attn for blk in model.blocks)
    assert all("forward" not in vars(blk.attn) for blk in model.blocks)
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_ignores_other_threads() -> None:
    model = small_vit()
    x = torch.randn(1, 1, 32, 32)
    with capture_attention(model) as cap:
        t = threading.Thread(target=lambda: model(torch.randn(3, 1, 32, 32)))
        t.start()
        t.join()
        assert cap.attentions == []
        with torch.no_grad():
            model(x)
    assert len(cap.attentions) == len(model.blocks)
    assert all(a.shape[0] == 1 for a in cap.attentions)


def test_attention_rollout_on_a_model(tiny_lungvit) -> None:
    model = tiny_lungvit
    assert grid_shape(model) == (8, 8)
    x = torch.randn(1, 1, 32, 32)
    m, logits = attention_rollout(model, x)
    assert m.shape == (1, 8, 8) and torch.isfinite(m).all() and (m > 0).all()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
    want = reference_rollout([a[0].double().numpy() for a in manual_attentions(model, x)], "mean", 1)
    np.testing.assert_allclose(m.reshape(-1).numpy(), want, rtol=1e-4, atol=1e-7)


def test_gradient_rollout_matches_an_independent_computation(tiny_lungvit) -> None:
    model = tiny_lungvit
    x = torch.randn(1, 1, 32, 32)
    target = 3
    got, _ = gradient_rollout(model, x, target)

    # Independent: retain_grad on each block's attention via a patched attn_drop.
    kept: list[torch.Tensor] = []

    class Keep(torch.nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            a.retain_grad()
            kept.append(a)
            return a

    clone = __import__("copy").deepcopy(model)
    for blk in clone.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop = Keep()
    clone(x)[0, target].backward()
    weighted = [(a * a.grad.clamp(min=0)).mean(1, keepdim=True).detach() for a in kept]
    want = rollout(weighted, num_prefix_tokens=1, grid=(8, 8))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters()), "explaining wrote .grad on the served model"
    # Class-specific: another class gives another map.
    other, _ = gradient_rollout(model, x, 5)
    assert not torch.allclose(other, got)
