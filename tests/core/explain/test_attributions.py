"""Attribution methods, the explain() entry point and overlays."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from lungvit.core.explain import METHODS, AttributionContext, compute, explain
from lungvit.core.explain.api import display_map
from lungvit.core.explain.attributions import blur, gradcam_layer
from lungvit.core.explain.overlay import _lut, colormap, normalize_map, overlay
from lungvit.core.model.preprocess import PreprocessConfig, to_model_input, upsample_map

from .conftest import constant_image, small_vit

CFG = PreprocessConfig(input_size=32, mean=0.5, std=0.5)
CTX = AttributionContext.from_preprocess(CFG)


def test_context_is_black_in_normalised_space() -> None:
    assert CTX.baseline_value == pytest.approx(-1.0)
    assert CTX.value_range == pytest.approx((-1.0, 1.0))
    cfg = PreprocessConfig(input_size=32, mean=0.2, std=0.25)
    assert AttributionContext.from_preprocess(cfg).baseline_value == pytest.approx(-0.8)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_every_method_is_finite_on_a_constant_image(tiny_lungvit, value: float) -> None:
    scan = constant_image(value, size=40)
    es = explain(tiny_lungvit, scan, preprocess=CFG, methods=list(METHODS))
    assert list(es.explanations) == list(METHODS)
    for e in es:
        assert e.map.shape == scan.shape and e.map.dtype == np.float32
        assert np.isfinite(e.map).all() and np.isfinite(e.raw).all(), e.method
        assert e.map.min() >= 0.0 and e.map.max() <= 1.0
        assert e.overlay.shape == (*scan.shape, 3) and e.overlay.dtype == np.uint8
        assert all(np.isfinite(v) for v in e.faithfulness.values()), e.method
        assert e.seconds >= 0


def test_maps_come_back_at_the_scans_resolution_through_the_shared_resize(vit) -> None:
    rng = np.random.default_rng(0)
    scan = rng.random((70, 90)).astype(np.float32)  # not square, not the input size
    es = explain(vit, scan, preprocess=CFG, methods=["rollout", "ig"], faithfulness=False)
    for e in es:
        assert e.map.shape == (70, 90)
        raw = torch.from_numpy(e.raw)
        shown = raw.clamp(min=0) if e.method == "ig" else raw
        np.testing.assert_allclose(e.map, normalize_map(upsample_map(shown, (70, 90))), atol=1e-6)
    assert es["rollout"].raw.shape == (8, 8) and es["ig"].raw.shape == (32, 32)


def test_a_token_map_lands_where_its_token_is() -> None:
    """Alignment: a hot top-left token of an 8 x 8 grid covers the top-left 1/8 of any scan."""
    raw = torch.zeros(8, 8)
    raw[0, 0] = 1.0
    m = normalize_map(upsample_map(raw, (80, 120)))
    r, c = np.unravel_index(int(m.argmax()), m.shape)
    assert r < 10 and c < 15
    assert m[40:, 60:].max() == 0.0


def test_integrated_gradients_completeness(tiny_lungvit) -> None:
    rng = np.random.default_rng(1)
    x = to_model_input(rng.random((32, 32)).astype(np.float32), CFG)[None]
    with torch.no_grad():
        logits = tiny_lungvit(torch.cat([x, torch.full_like(x, -1.0)]))
    target = int(logits[0].argmax())
    r = compute(tiny_lungvit, x, "ig", target, ctx=CTX)
    diff = float(logits[0, target] - logits[1, target])
    total = float(r.raw.double().sum())
    assert r.extras["converged"], r.extras
    # Completeness within 1 % of the logit, from the map's sum and the model alone; and the
    # reported delta is that same gap, not a number of its own.
    assert total == pytest.approx(diff, abs=0.01 * abs(float(logits[0, target])))
    assert r.extras["delta"] == pytest.approx(total - diff, abs=1e-4)
    assert r.extras["logit"] == pytest.approx(float(logits[0, target]), abs=1e-4)
    assert r.extras["baseline_logit"] == pytest.approx(float(logits[1, target]), abs=1e-4)


def test_integrated_gradients_fixed_steps_and_the_budget(tiny_lungvit) -> None:
    x = torch.randn(1, 1, 32, 32)
    fixed = compute(tiny_lungvit, x, "ig", 0, ctx=CTX, n_steps=4)
    assert fixed.extras["n_steps"] == 4 and fixed.extras["segments"] == 1
    strict = compute(tiny_lungvit, x, "ig", 0, ctx=CTX, rel_tol=1e-9, start_steps=4, segment_steps=4,
                     max_steps=16)
    # 4 nodes, then one bisection (8 more); a second would pass the 16-evaluation budget.
    assert strict.extras["evaluations"] == 12 and strict.extras["segments"] == 2
    assert strict.extras["n_steps"] == 8 and strict.extras["converged"] is False
    # The delta reported is Captum's own definition.
    from captum.attr import IntegratedGradients

    _, captum_delta = IntegratedGradients(tiny_lungvit).attribute(
        x, baselines=torch.full_like(x, -1.0), target=0, n_steps=4, return_convergence_delta=True)
    assert fixed.extras["delta"] == pytest.approx(float(captum_delta[0]), abs=1e-4)


class StepOnThePath(torch.nn.Module):
    """Class 0's logit jumps by 10 where the mean brightness crosses 0.8 (a sharp step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 10.0 * torch.sigmoid(60.0 * (x.mean(dim=(1, 2, 3)) - 0.8))  # (B,)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_integrated_gradients_refines_where_the_path_jumps() -> None:
    model = StepOnThePath()
    x = torch.ones(1, 1, 8, 8)  # the path from -1 to 1 crosses the step at 90 % of the way
    want = float(model(x)[0, 0] - model(-x)[0, 0])
    one_rule = compute(model, x, "ig", 0, ctx=CTX, n_steps=16)
    assert abs(one_rule.extras["delta"]) > 0.01 * want  # 16 nodes in one rule miss the step
    r = compute(model, x, "ig", 0, ctx=CTX)
    assert r.extras["converged"] and r.extras["evaluations"] <= 64, r.extras
    assert r.extras["segments"] > 1
    total = float(r.raw.double().sum())
    assert total == pytest.approx(want, abs=0.01 * abs(float(model(x)[0, 0])))
    assert r.extras["delta"] == pytest.approx(total - want, abs=1e-6)


def _stem_activation_and_grad(model: torch.nn.Module, x: torch.Tensor, target: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    acts = []
    h = model.patch_embed.backbone.register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        out = model(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(out[0, target], acts[0])
    return acts[0][0].detach(), g[0]  # (C, h, w) each


def test_gradcam_weights_the_conv_stem_by_its_gradients(tiny_lungvit) -> None:
    """Grad-CAM reads the conv stem (before attention mixes tokens); check both weightings
    against a direct computation."""
    model = tiny_lungvit
    x = torch.randn(1, 1, 32, 32)
    assert gradcam_layer(model) is model.patch_embed.backbone
    r = compute(model, x, "gradcam", 2, ctx=CTX)
    assert r.raw.shape == (8, 8) and float(r.raw.abs().sum()) > 0
    assert r.signed and r.extras == {"weights": "positive"}  # shown as relu(raw)
    a, g = _stem_activation_and_grad(model, x, 2)
    assert (a >= 0).all()  # the stem ends in a ReLU
    torch.testing.assert_close(r.raw, (a * g.clamp(min=0)).sum(0), rtol=1e-4, atol=1e-6)
    hires = compute(model, x, "gradcam", 2, ctx=CTX, weights="elementwise")
    torch.testing.assert_close(hires.raw, (a * g).sum(0), rtol=1e-4, atol=1e-6)
    classic = compute(model, x, "gradcam", 2, ctx=CTX, weights="mean")
    alpha = g.mean(dim=(1, 2))  # (C,): Selvaraju et al.'s channel weights
    torch.testing.assert_close(classic.raw, torch.einsum("c,chw->hw", alpha, a), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        compute(model, x, "gradcam", 2, ctx=CTX, weights="max")


def test_gradcam_on_a_plain_vit_reads_the_patch_projection(vit) -> None:
    assert gradcam_layer(vit) is vit.patch_embed.proj
    r = compute(vit, torch.randn(1, 1, 32, 32), "gradcam", 1, ctx=CTX)
    assert r.raw.shape == (8, 8) and torch.isfinite(r.raw).all() and float(r.raw.abs().sum()) > 0


def test_last_block_outputs_would_give_no_gradcam(tiny_lungvit) -> None:
    """Why not the last block: its output patch tokens never reach a [CLS] head."""
    model = tiny_lungvit
    x = torch.randn(1, 1, 32, 32)
    outs = []
    h = model.blocks[-1].register_forward_hook(lambda m, i, o: outs.append(o))
    try:
        out = model(x)
    finally:
        h.remove()
    (g_out,) = torch.autograd.grad(out[0, 2], outs[0])
    assert float(g_out[0, 1:].abs().max()) == 0.0


def test_occlusion_window_is_sized_to_the_input(vit) -> None:
    r = compute(vit, torch.randn(1, 1, 32, 32), "occlusion", 0, ctx=CTX)
    assert (r.extras["window"], r.extras["stride"]) == (8, 4)
    assert r.raw.shape == (32, 32) and torch.isfinite(r.raw).all()


@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap"])
def test_noisy_methods_are_reproducible_and_leave_the_global_rng_alone(vit, method: str) -> None:
    x = torch.randn(1, 1, 32, 32)
    torch.manual_seed(123)
    np.random.seed(123)
    before, np_before = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = compute(vit, x, method, 1, ctx=CTX)
    assert torch.equal(torch.get_rng_state(), before)
    np.testing.assert_array_equal(np.random.get_state()[1], np_before)
    b = compute(vit, x, method, 1, ctx=CTX)
    torch.testing.assert_close(a.raw, b.raw)
    c = compute(vit, x, method, 1, ctx=CTX, seed=7)
    assert not torch.allclose(a.raw, c.raw)


def test_signed_methods_show_their_positive_part(vit) -> None:
    r = compute(vit, torch.randn(1, 1, 32, 32), "ig", 4, ctx=CTX, n_steps=8)
    assert r.signed and (r.raw < 0).any()
    assert (display_map(r) >= 0).all()
    torch.testing.assert_close(display_map(r), r.raw.clamp(min=0))


def test_explain_defaults_to_the_predicted_class_and_honours_target(vit) -> None:
    scan = np.random.default_rng(2).random((32, 32)).astype(np.float32)
    es = explain(vit, scan, preprocess=CFG, faithfulness=False)
    assert es.target == int(np.argmax(es.logits))
    assert es.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    hot = explain(vit, scan, preprocess=CFG, target=3, temperature=2.0, faithfulness=False)
    assert hot.target == 3 and hot["rollout"].target == 3
    # Temperature changes probabilities, never the ranking.
    assert np.argmax(hot.probabilities) == np.argmax(es.probabilities)
    summary = es.summary(labels=[f"c{i}" for i in range(9)])
    assert summary["target_label"] == f"c{es.target}" and summary["methods"][0]["method"] == "rollout"


def test_explain_works_under_a_callers_inference_mode(vit) -> None:
    scan = np.random.default_rng(3).random((32, 32)).astype(np.float32)
    with torch.inference_mode():
        es = explain(vit, scan, preprocess=CFG, methods=["grad_rollout", "ig", "gradcam"], faithfulness=False)
    assert all(np.isfinite(e.map).all() for e in es)


def test_explain_refuses_bad_requests(vit) -> None:
    scan = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain(vit, scan, preprocess=CFG, methods=["lime"])
    with pytest.raises(ValueError, match="unknown method"):
        explain(vit, scan, preprocess=CFG, lime={"x": 1})
    with pytest.raises(ValueError, match="target class"):
        explain(vit, scan, preprocess=CFG, target=9)
    with pytest.raises(ValueError, match="finite"):
        explain(vit, np.full((32, 32), np.nan, np.float32), preprocess=CFG)
    with pytest.raises(ValueError, match="eval"):
        explain(small_vit().train(), scan, preprocess=CFG)


def test_method_options_reach_the_method(vit) -> None:
    scan = np.random.default_rng(4).random((32, 32)).astype(np.float32)
    es = explain(vit, scan, preprocess=CFG, methods=["rollout", "ig"], faithfulness=False,
                 rollout={"head_fusion": "max", "discard_ratio": 0.9}, ig={"n_steps": 6})
    assert es["rollout"].extras == {"head_fusion": "max", "discard_ratio": 0.9}
    assert es["ig"].extras["n_steps"] == 6


# ----------------------------------------------------------------------------- overlays


def test_colormap_endpoints_and_lightness_order() -> None:
    c = colormap(np.linspace(0, 1, 257))
    assert c.shape == (257, 3) and c.min() >= 0 and c.max() <= 1
    luma = c @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luma) > -1e-6), "inferno must get lighter monotonically"
    np.testing.assert_allclose(colormap(np.array([np.nan, -1.0, 2.0])), c[[0, 0, -1]], atol=1e-6)
    with pytest.raises(ValueError):
        colormap(np.zeros(3), "jet")


def test_colormap_and_overlay_table_are_matplotlibs() -> None:
    v = np.linspace(0, 1, 1001)
    for name in ("inferno", "viridis"):
        np.testing.assert_allclose(colormap(v, name), matplotlib.colormaps[name](v)[:, :3], atol=1e-7)
        levels = np.linspace(0, 1, 1024)
        expected = (matplotlib.colormaps[name](levels)[:, :3] * 255).astype(np.float32)
        np.testing.assert_allclose(_lut(name), expected, atol=1e-4)
        assert _lut(name).shape == (1024, 3) and not _lut(name).flags.writeable


def test_overlay_opacity() -> None:
    scan = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    heat = np.full((3, 4), 1.0, np.float32)
    gray = overlay(scan, heat, opacity=0.0)
    np.testing.assert_array_equal(gray[..., 0], np.rint(scan * 255).astype(np.uint8))
    assert (gray[..., 0] == gray[..., 2]).all()
    full = overlay(scan, heat, opacity=1.0)
    np.testing.assert_array_equal(full, np.broadcast_to(np.rint(colormap(heat) * 255).astype(np.uint8), full.shape))
    half = overlay(scan, heat, opacity=0.5).astype(int)
    assert np.abs(half - (gray.astype(int) + full.astype(int)) / 2).max() <= 1
    weighted = overlay(scan, np.zeros((3, 4), np.float32), opacity=1.0, weighted=True)
    np.testing.assert_array_equal(weighted, gray)
    with pytest.raises(ValueError):
        overlay(scan, heat, opacity=1.5)
    with pytest.raises(ValueError):
        overlay(scan, heat[:2], opacity=0.5)


def test_normalize_map() -> None:
    np.testing.assert_array_equal(normalize_map(np.full((2, 2), 3.0)), np.zeros((2, 2), np.float32))
    m = normalize_map(np.array([[1.0, 2.0], [3.0, np.nan]]))
    assert m.min() == 0.0 and m.max() == 1.0 and np.isfinite(m).all()


def test_blur_keeps_constants_and_shape() -> None:
    x = torch.full((1, 1, 16, 16), 0.3)
    torch.testing.assert_close(blur(x, 2.0), x)
    assert blur(torch.randn(2, 1, 10, 12), 4.0).shape == (2, 1, 10, 12)


def _numpy_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W) in float64: radius round(3 sigma) (1 or more, below
    the image's size), reflect padding without the edge pixel repeated."""
    r = min(max(1, round(3 * sigma)), img.shape[0] - 1, img.shape[1] - 1)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    p = np.pad(img.astype(np.float64), r, mode="reflect")
    rows = np.stack([np.convolve(row, k, mode="valid") for row in p])  # (H + 2r, W)
    return np.stack([np.convolve(col, k, mode="valid") for col in rows.T]).T  # (H, W)


@pytest.mark.parametrize("shape, sigma", [((16, 16), 1.0), ((32, 32), 4.0), ((10, 12), 4.0),
                                          ((224, 224), 28.0)])
def test_blur_matches_a_direct_convolution(shape: tuple[int, int], sigma: float) -> None:
    x = torch.from_numpy(np.random.default_rng(5).random((2, 3, *shape), dtype=np.float32))
    y = blur(x, sigma)
    assert y.shape == x.shape and y.dtype == x.dtype
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(y[b, c].numpy(), _numpy_blur(x[b, c].numpy(), sigma), atol=2e-6)
