"""Attribution methods for one target class, each returning a raw map at model resolution.

Every method is a function ``(model, x, target, *, ctx, **options) -> RawAttribution``
registered in :data:`METHODS`; :func:`compute` dispatches by name. ``x`` is one normalised
model input (1, C, S, S); the raw map is either at input resolution (S, S) (Captum's
pixel methods) or on the token grid (h, w) (rollout, Grad-CAM on the embedding's feature map). ``ctx`` carries the
baseline (black, normalised) and the value range of the input space.

Captum methods (Integrated Gradients, GradientSHAP, Saliency + SmoothGrad, Occlusion) use
``torch.autograd.grad`` internally and register no hooks on the model, so they are safe on a
shared instance. Grad-CAM needs a hook; like the attention capture it records only the
calling thread's forward pass and runs under the per-model lock.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from captum.attr import GradientShap, IntegratedGradients, NoiseTunnel, Occlusion, Saliency
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from lungvit.core.explain.rollout import attention_rollout, gradient_rollout, model_lock
from lungvit.core.model.preprocess import PreprocessConfig, normalize

# Seeded sections (SmoothGrad, GradientSHAP) fork the global RNG; forks of the process-wide
# generator must not interleave, so they take this lock (it guards RNG state, holds no data).
_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class AttributionContext:
    """What every method needs besides the model and input.

    Attributes:
        baseline_value: the normalised value of black, ``(0 - mean) / std``.
        value_range: (low, high) of the normalised input space (black, white).
    """

    baseline_value: float
    value_range: tuple[float, float]

    @property
    def span(self) -> float:
        return self.value_range[1] - self.value_range[0]

    def baseline(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.baseline_value)

    @classmethod
    def from_preprocess(cls, cfg: PreprocessConfig | None) -> AttributionContext:
        """Black and white of the [0, 1] scan, in the model's normalised input space."""
        cfg = cfg or PreprocessConfig()
        lo, hi = float(normalize(0.0, cfg)), float(normalize(1.0, cfg))
        return cls(baseline_value=lo, value_range=(lo, hi))


@dataclass
class RawAttribution:
    """A method's raw output for one input.

    Attributes:
        raw: (h, w) signed (or non-negative) map at model resolution, float32, on CPU.
        signed: whether negative values mean evidence *against* the target.
        extras: method-specific numbers (IG convergence delta, steps, ...).
        logits: the model's logits on the input when the method ran a plain forward pass
            anyway (rollout), so a caller need not run another.
    """

    raw: torch.Tensor
    signed: bool
    extras: dict[str, Any] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # (K,) when the method's own forward pass gave them


def _reduce_channels(attr: torch.Tensor) -> torch.Tensor:
    """(1, C, S, S) -> (S, S) by summing channels (completeness is kept)."""
    return attr.detach().sum(dim=1)[0].float().cpu()


def _forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda inp: model(inp)


# ----------------------------------------------------------------------------- attention


def rollout_method(model: nn.Module, x: torch.Tensor, target: int, *, ctx: AttributionContext,
                   head_fusion: str = "mean", discard_ratio: float = 0.0) -> RawAttribution:
    """Attention rollout (class-agnostic; ``target`` is recorded, not used)."""
    m, logits = attention_rollout(model, x, head_fusion=head_fusion, discard_ratio=discard_ratio)
    return RawAttribution(m[0].float().cpu(), signed=False,
                          extras={"head_fusion": head_fusion, "discard_ratio": discard_ratio},
                          logits=logits[0].float())


def grad_rollout_method(model: nn.Module, x: torch.Tensor, target: int, *, ctx: AttributionContext,
                        discard_ratio: float = 0.0) -> RawAttribution:
    """Gradient-weighted, class-specific rollout."""
    m, _ = gradient_rollout(model, x, target, discard_ratio=discard_ratio)
    return RawAttribution(m[0].float().cpu(), signed=False, extras={"discard_ratio": discard_ratio})


# ----------------------------------------------------------------------------- Captum


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: int, *, ctx: AttributionContext,
                         n_steps: int | None = None, method: str = "gausslegendre",
                         start_steps: int = 4, segment_steps: int = 2, max_steps: int = 64,
                         rel_tol: float = 0.01, internal_batch_size: int = 32,
                         focus: float = 2.0) -> RawAttribution:
    """Integrated Gradients from the black baseline, by adaptive composite quadrature.

    The path from the baseline ``b`` to ``x`` is cut into segments, and Captum's
    IntegratedGradients runs on each segment (from ``b + a0 (x - b)`` to ``b + a1 (x - b)``);
    the segments' attributions add up to the whole path's. Completeness holds on every
    segment, so each one's own convergence delta, ``sum(attr_k) - (f(a1) - f(a0))``, is
    known from two forward passes, and the segments that carry the error are the ones
    refined:

    1. one segment, ``start_steps`` Gauss-Legendre nodes (enough for smooth paths: with
       random weights, lungvit_ref64 and lungvit_s128 reach |delta| < 0.5 % of the logit
       with 4 on each of four phantom scans);
    2. while ``|delta|`` (the sum of the segments' deltas) exceeds ``rel_tol * |f(x)|``,
       bisect the segments whose |delta_k| exceeds both an even share of that tolerance and
       ``1 / focus`` of the worst segment's, worst first, each half with ``segment_steps``
       Gauss-Legendre nodes (2: exact for cubics); the endpoint logits of new segments come
       from one batched forward pass;
    3. stop unconverged once another bisection would exceed ``max_steps`` gradient
       evaluations (all rounds counted, discarded ones included).

    Why: on trained models the logit along the black-to-scan path is far from smooth (dim
    scans are far from the training data): on the phantom-trained test models it jumps
    over a few percent of the path and wiggles elsewhere (on one scan: a fall of 3.3
    logits in the first 5 %, a total variation five times the net change). A single rule
    of any order spends its nodes where nothing happens. Doubling one Gauss-Legendre rule
    (6, 12, 24, 48 nodes: 90 evaluations
    in all) converged on 12 of 40 lesion scans of five such models; this refinement
    converged on 36 of 40 within 64 evaluations (median |delta| 0.4-0.6 % of the logit
    per model).
    Where it does not converge, ``converged`` is False and ``delta`` says by how much.

    With ``n_steps`` given, one rule of that many steps runs, without adaptation (Captum's
    own IG exactly). Steps run in batches of at most ``internal_batch_size``.

    Extras: ``delta`` (signed, Captum's definition), ``relative_delta`` (``|delta| / |f(x)|``),
    ``n_steps`` (path points in the final rule), ``evaluations`` (gradient evaluations spent),
    ``segments``, ``converged``, ``logit`` and ``baseline_logit``.
    """
    ig = IntegratedGradients(_forward(model))
    baseline = ctx.baseline(x)
    with torch.no_grad():
        ends = model(torch.cat([x, baseline]))[:, target].double().cpu()
    logit, base_logit = float(ends[0]), float(ends[1])
    tol = rel_tol * max(abs(logit), 1e-6)

    def on_path(alphas: list[float]) -> torch.Tensor:
        a = torch.tensor(alphas, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
        return baseline + a * (x - baseline)  # (K, C, S, S)

    f = {0.0: base_logit, 1.0: logit}  # the target logit at path positions
    done: dict[tuple[float, float], tuple[torch.Tensor, float, int]] = {}  # (a0, a1) -> (attr, delta, nodes)
    pending, steps, evaluations = [(0.0, 1.0)], n_steps or start_steps, 0
    while True:
        lo, hi = [a for a, _ in pending], [b for _, b in pending]
        attr = ig.attribute(on_path(hi), baselines=on_path(lo), target=target, n_steps=steps, method=method,
                            internal_batch_size=max(len(pending), min(len(pending) * steps, internal_batch_size)))
        evaluations += len(pending) * steps
        sums = attr.detach().double().flatten(1).sum(1).cpu()  # (K,)
        for k, seg in enumerate(pending):
            done[seg] = (attr[k:k + 1].detach(), float(sums[k]) - (f[seg[1]] - f[seg[0]]), steps)
        d = sum(v[1] for v in done.values())
        if n_steps is not None or abs(d) <= tol:
            break
        # Bisect the segments that carry most of the error: above an even share of the
        # tolerance and within a factor ``focus`` of the worst one, worst first.
        share = max(tol / len(done), max(abs(v[1]) for v in done.values()) / focus)
        worst = sorted((seg for seg, v in done.items() if abs(v[1]) >= share), key=lambda s: -abs(done[s][1]))
        budget = (max_steps - evaluations) // (2 * segment_steps)
        if not worst or budget < 1:
            break
        split = worst[:budget]
        mids = [(a + b) / 2 for a, b in split]
        with torch.no_grad():
            f.update(zip(mids, model(on_path(mids))[:, target].double().cpu().tolist()))
        pending, steps = [], segment_steps
        for (a, b), m in zip(split, mids):
            del done[(a, b)]
            pending += [(a, m), (m, b)]
    total = torch.cat([v[0] for v in done.values()]).sum(dim=0, keepdim=True)  # (1, C, S, S)
    return RawAttribution(_reduce_channels(total), signed=True, extras={
        "delta": d, "relative_delta": abs(d) / max(abs(logit), 1e-12),
        "n_steps": sum(v[2] for v in done.values()), "evaluations": evaluations, "segments": len(done),
        "method": method, "converged": abs(d) <= tol, "logit": logit, "baseline_logit": base_logit})


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global torch and numpy RNGs seeded, then restore them.

    Captum draws from both: NoiseTunnel's noise from torch, GradientSHAP's baseline choice
    and path coefficients from numpy.
    """
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        np_state = np.random.get_state()
        try:
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield
        finally:
            np.random.set_state(np_state)


def gradient_shap(model: nn.Module, x: torch.Tensor, target: int, *, ctx: AttributionContext,
                  n_samples: int = 16, stdev: float = 0.05, seed: int = 0) -> RawAttribution:
    """GradientSHAP: expected gradients x (input - baseline) over a baseline distribution.

    The distribution is black and a heavily blurred copy of the scan (structure removed,
    brightness kept), each with Gaussian noise of ``stdev`` times the input range.
    """
    baselines = torch.cat([ctx.baseline(x), blur(x, sigma=x.shape[-1] / 8)])
    with seeded(seed):
        # No convergence delta: it would cost another forward pass per sample, and for a
        # sampled expectation it says little about one map.
        attr = GradientShap(_forward(model)).attribute(
            x, baselines=baselines, target=target, n_samples=n_samples, stdevs=stdev * ctx.span)
    return RawAttribution(_reduce_channels(attr), signed=True, extras={"n_samples": n_samples})


def smoothgrad(model: nn.Module, x: torch.Tensor, target: int, *, ctx: AttributionContext,
               n_samples: int = 16, stdev: float = 0.15, seed: int = 0,
               batch_size: int = 32) -> RawAttribution:
    """Saliency (|d logit / d x|) averaged over noisy copies (SmoothGrad, via NoiseTunnel).

    ``stdev`` is a fraction of the input range (Smilkov et al. suggest 10-20 %).
    """
    nt = NoiseTunnel(Saliency(_forward(model)))
    with seeded(seed):
        attr = nt.attribute(x, nt_type="smoothgrad", nt_samples=n_samples,
                            nt_samples_batch_size=min(n_samples, batch_size),
                            stdevs=stdev * ctx.span, target=target, abs=True)
    return RawAttribution(_reduce_channels(attr), signed=False, extras={"n_samples": n_samples})


def occlusion(model: nn.Module, x: torch.Tensor, target: int, *, ctx: AttributionContext,
              window: int | None = None, stride: int | None = None,
              batch_size: int = 64) -> RawAttribution:
    """Occlusion: the drop in the target logit when a window is set to black.

    Defaults size the window to a quarter of the input side and slide it by half a window,
    so a 64-pixel input takes 7 x 7 = 49 occluded forwards.
    """
    c, s = x.shape[1], x.shape[-1]
    window = window or max(2, s // 4)
    stride = stride or max(1, window // 2)
    attr = Occlusion(_forward(model)).attribute(
        x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
        baselines=ctx.baseline_value, target=target, perturbations_per_eval=batch_size)
    return RawAttribution(_reduce_channels(attr), signed=True, extras={"window": window, "stride": stride})


# ----------------------------------------------------------------------------- Grad-CAM


GRADCAM_WEIGHTS = ("positive", "elementwise", "mean")


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM reads: the last feature map whose every unit belongs to one place.

    That is the embedding's convolutional output, before any attention: LungViT's conv stem
    (``patch_embed.backbone``, the hybrid ViT's "last convolutional layer", where Grad-CAM is
    taken in a CNN), or a plain ViT's patch projection (``patch_embed.proj``). After it the
    blocks' attention mixes every token into every other, so a later token's features no
    longer describe its own patch. (The last block's *output* patch tokens never reach a
    [CLS]-token head at all: their gradient is zero.)
    """
    pe = getattr(model, "patch_embed", None)
    for name in ("backbone", "proj"):
        layer = getattr(pe, name, None)
        if isinstance(layer, nn.Module):
            return layer
    raise ValueError("Grad-CAM needs a timm VisionTransformer-style patch_embed with a "
                     "convolutional `backbone` or `proj`")


@contextlib.contextmanager
def capture_output(model: nn.Module, layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record ``layer``'s outputs for forward passes on this thread; always unhooks."""
    owner = threading.get_ident()
    out: list[torch.Tensor] = []

    def hook(_mod: nn.Module, _inp: Any, output: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            out.append(output)

    with model_lock(model):
        handle = layer.register_forward_hook(hook)
        try:
            yield out
        finally:
            handle.remove()


def gradcam(model: nn.Module, x: torch.Tensor, target: int, *, ctx: AttributionContext,
            weights: str = "positive") -> RawAttribution:
    """Grad-CAM on the embedding's feature map: ``relu(sum_c W_c * A_c)`` per position.

    ``A`` is the (C, h, w) output of :func:`gradcam_layer` (for LungViT the conv stem's
    ReLU output, so ``A >= 0``) and the weights ``W`` come from ``dy/dA``, ``y`` the target
    logit. How the gradients are pooled into weights is what makes Grad-CAM work or not on
    a ViT:

    * ``"mean"``: classic Grad-CAM (Selvaraju et al., 2017), one weight per channel,
      ``mean_hw(dy/dA_c)``. Averaging loses nothing in a CNN with a global-average-pooled
      head, where every position receives the same gradient (Grad-CAM is then CAM). A ViT
      breaks that assumption: learned position embeddings and attention give every token
      its own gradient, and the average cancels what distinguishes the lesion's tokens.
      Measured on five phantom-trained lungvit_tiny models (the tests' recipe; five seeds
      and phantom sets), channel-averaged Grad-CAM put 0.6-1.2x a random map's mass on the
      lesion at the stem, and 0.3-2.3x at the blocks' inputs: no better than random.
    * ``"elementwise"``: each activation weighted by its own gradient, ``dy/dA * A``
      (HiResCAM, Draelos & Carin, 2020, proposed because the averaging step can highlight
      regions the model did not use): 1.4-2.6x random on the same models.
    * ``"positive"`` (default): each activation weighted by its own positive gradient,
      ``relu(dy/dA) * A`` (LayerCAM, Jiang et al., 2021, designed for shallow layers, whose
      gradients vary across positions): 1.8-2.9x random on the same models, and above
      random on every one of them for the scans the tests use. With ``A >= 0`` every term
      is evidence *for* the class.

    All three are gradient-weighted activations followed by a ReLU. The raw map is the
    signed sum before the ReLU; its positive part, which is shown and scored, is the map.
    """
    if weights not in GRADCAM_WEIGHTS:
        raise ValueError(f"Grad-CAM weights must be one of {GRADCAM_WEIGHTS}, got {weights!r}")
    with torch.enable_grad(), capture_output(model, gradcam_layer(model)) as outs:
        logits = model(x)
        if len(outs) != 1:
            raise RuntimeError(f"Grad-CAM expected one activation, captured {len(outs)}")
        act = outs[0]  # (1, C, h, w)
        (grad,) = torch.autograd.grad(logits[:, target].sum(), act)
    if act.ndim != 4:
        raise RuntimeError(f"Grad-CAM expected a (B, C, h, w) feature map, got shape {tuple(act.shape)}")
    if weights == "mean":
        grad = grad.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    elif weights == "positive":
        grad = grad.clamp(min=0)
    cam = (grad * act.detach()).sum(dim=1)  # (1, h, w), ReLU applied for display
    return RawAttribution(cam[0].float().cpu(), signed=True, extras={"weights": weights})


# ----------------------------------------------------------------------------- helpers


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) with reflect padding (torchvision's), kernel about 6 sigma.

    The kernel's radius is ``round(3 * sigma)`` (at least 1, at most the image's size
    less one, as reflect padding needs). Applied one axis at a time: torchvision's square
    kernel costs 40 to 70 times as much at sigma = S / 8 (S = 224 and 384, one thread).
    """
    radius = max(1, int(round(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    k = 2 * radius + 1
    y = gaussian_blur(x, kernel_size=[k, 1], sigma=[sigma, sigma])  # along W
    return gaussian_blur(y, kernel_size=[1, k], sigma=[sigma, sigma])  # along H


Method = Callable[..., RawAttribution]

METHODS: dict[str, Method] = {
    "rollout": rollout_method,
    "grad_rollout": grad_rollout_method,
    "ig": integrated_gradients,
    "gradient_shap": gradient_shap,
    "smoothgrad": smoothgrad,
    "occlusion": occlusion,
    "gradcam": gradcam,
}


def compute(model: nn.Module, x: torch.Tensor, method: str, target: int, *,
            ctx: AttributionContext, **options: Any) -> RawAttribution:
    """Run one registered method on a (1, C, S, S) input for class ``target``."""
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown explanation method {method!r}; choose from {', '.join(METHODS)}") from None
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one (1, C, S, S) input, got shape {tuple(x.shape)}")
    # Gradients are needed even when the caller runs under inference_mode or no_grad.
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        return fn(model, x, int(target), ctx=ctx, **options)
