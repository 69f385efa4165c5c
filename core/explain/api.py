"""``explain(...)``: several maps for one scan, each with a faithfulness score.

One call preprocesses the scan the way prediction does (:func:`to_model_input`), runs the
served model once for the probabilities (when rollout is asked for, its capture pass is that
run), computes each requested map for the target class, returns each map at the scan's
resolution (the inverse of the whole-frame resize, :func:`upsample_map`) with an overlay,
and scores every map by deletion/insertion AUC beside random maps', in batched forward
passes.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lungvit.core.explain.attributions import METHODS, AttributionContext, RawAttribution, blur, compute
from lungvit.core.explain.faithfulness import deletion_insertion, random_maps
from lungvit.core.explain.overlay import normalize_map, overlay
from lungvit.core.explain.rollout import grid_shape
from lungvit.core.model.preprocess import PreprocessConfig, to_model_input, upsample_map


@dataclass
class Explanation:
    """One method's explanation of one scan.

    Attributes:
        method: the method's name (see :data:`METHODS`).
        target: the class explained.
        map: (H, W) float32 in [0, 1] at the scan's resolution, or at the display size
            asked for (``max_side``), positive evidence for signed methods, aligned with
            the scan.
        raw: the method's raw map at model resolution, (h, w) on the token grid or (S, S) at
            the input, float32, signed where the method is.
        overlay: (H, W, 3) uint8 RGB, the map over the scan (same size as ``map``; see
            :func:`render_overlay` for another size).
        seconds: wall time of the method, map and overlay (faithfulness not included; for
            rollout it includes the forward pass that also gives the prediction).
        extras: method-specific numbers (e.g. ``delta`` for Integrated Gradients).
        faithfulness: ``deletion_auc``, ``insertion_auc``, ``random_deletion_auc``,
            ``random_insertion_auc`` (lower deletion / higher insertion is better), or empty.
        signed: ``raw`` is signed (the map shown is its positive part).
    """

    method: str
    target: int
    map: np.ndarray
    raw: np.ndarray
    overlay: np.ndarray
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)
    faithfulness: dict[str, float] = field(default_factory=dict)
    signed: bool = False

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no arrays)."""
        return {"method": self.method, "target": self.target, "seconds": self.seconds,
                "raw_shape": list(self.raw.shape), "extras": _jsonable(self.extras),
                "faithfulness": dict(self.faithfulness)}


@dataclass
class ExplanationSet:
    """Every requested explanation of one scan, with the prediction they explain.

    Attributes:
        target: the class explained.
        probabilities: (K,) softmax of the logits (divided by ``temperature``).
        logits: (K,) raw logits.
        explanations: method name -> :class:`Explanation`, in the order requested.
        faithfulness_seconds: wall time of the deletion/insertion scoring.
    """

    target: int
    probabilities: np.ndarray
    logits: np.ndarray
    explanations: dict[str, Explanation]
    faithfulness_seconds: float = 0.0

    def __getitem__(self, method: str) -> Explanation:
        return self.explanations[method]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.explanations.values())

    def summary(self, labels: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready numbers: the prediction and each method's summary."""
        out: dict[str, Any] = {"target": self.target,
                               "probability": float(self.probabilities[self.target]),
                               "faithfulness_seconds": self.faithfulness_seconds,
                               "methods": [e.summary() for e in self]}
        if labels is not None:
            out["target_label"] = labels[self.target]
        return out


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d.items()}


def display_map(r: RawAttribution) -> torch.Tensor:
    """The non-negative map that is shown and scored: the positive part of a signed map."""
    return r.raw.clamp(min=0) if r.signed else r.raw


def display_shape(shape: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``shape`` scaled down (aspect kept) so its longest side is at most ``max_side``."""
    h, w = int(shape[0]), int(shape[1])
    if max_side is None or max(h, w) <= max_side:
        return h, w
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def shrink(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An (H, W) image in [0, 1] resized to ``shape`` (anti-aliased; itself if equal)."""
    if tuple(pixels.shape) == tuple(shape):
        return pixels
    t = torch.as_tensor(np.ascontiguousarray(pixels), dtype=torch.float32)[None, None]
    out = torch.nn.functional.interpolate(t, size=tuple(shape), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out[0, 0].clamp_(0.0, 1.0).numpy()


def render_overlay(e: Explanation, pixels: np.ndarray, *, opacity: float = 0.5,
                   cmap: str = "inferno") -> np.ndarray:
    """Draw an explanation over a scan at that scan's size (e.g. the full-resolution one
    for a download, when ``explain`` drew it at display size).

    Args:
        e: the explanation (its model-resolution ``raw`` map is used).
        pixels: (H, W) scan in [0, 1].
        opacity / cmap: as in :func:`overlay`.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    return overlay(pixels, map_at(e, pixels.shape), opacity=opacity, cmap=cmap)


def map_at(e: Explanation, shape: tuple[int, ...]) -> np.ndarray:
    """The explanation's map as :func:`explain` shows it ([0, 1]; a signed map's positive
    part), upsampled from its model-resolution ``raw`` map to ``shape`` (H, W)."""
    raw = torch.from_numpy(e.raw)
    shown = raw.clamp(min=0) if e.signed else raw
    return normalize_map(upsample_map(shown, (int(shape[0]), int(shape[1]))))


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _token_stride(model: nn.Module, size: tuple[int, int]) -> int:
    """Pixels per token along a side (the cell size for deletion/insertion); 1 if unknown."""
    try:
        h, w = grid_shape(model)
    except ValueError:
        return 1
    p = size[0] // h
    return p if p >= 1 and size[0] == p * h and size[1] == p * w else 1


def explain(
    model: nn.Module,
    pixels: np.ndarray,
    *,
    preprocess: PreprocessConfig,
    methods: Sequence[str] = ("rollout",),
    target: int | None = None,
    faithfulness: bool = True,
    opacity: float = 0.5,
    temperature: float = 1.0,
    cmap: str = "inferno",
    faithfulness_steps: int = 16,
    faithfulness_patch: int | None = None,
    random_seeds: int = 3,
    max_side: int | None = None,
    **method_options: Mapping[str, Any],
) -> ExplanationSet:
    """Explain the model's prediction on one scan with one or more methods.

    Args:
        model: the served model, in eval mode (it is used as is; fused attention is turned
            off only while attention is captured, and restored).
        pixels: (H, W) scan in [0, 1] (as :func:`lungvit.core.io.ingest.load_scan` returns it).
        preprocess: the checkpoint's preprocessing constants.
        methods: any of "rollout", "grad_rollout", "ig", "gradient_shap", "smoothgrad",
            "occlusion", "gradcam".
        target: class index to explain; default: the predicted class.
        faithfulness: score every map by deletion/insertion AUC beside random maps.
        opacity: overlay opacity, 0..1.
        temperature: divides the logits before the softmax (calibration; argmax unchanged).
        cmap: overlay colour map, "inferno" or "viridis".
        faithfulness_steps: number of deletion/insertion steps.
        faithfulness_patch: side of the cells removed/added together, in input pixels;
            default: one token's stride (4 for a 64-pixel input on a 16 x 16 grid).
        random_seeds: random maps averaged for the random AUCs.
        max_side: draw maps and overlays with the scan scaled down so its longest side is
            at most this (what a viewer shows; the model input is made from the full scan
            either way); None: at the scan's resolution.
        method_options: per-method keyword arguments, e.g. ``rollout={"discard_ratio": 0.9}``,
            ``ig={"n_steps": 32}``.

    Returns:
        An :class:`ExplanationSet`.
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown explanation method(s) {unknown or methods}; choose from {', '.join(METHODS)}")
    stray = [k for k in method_options if k not in METHODS]
    if stray:
        raise ValueError(f"options given for unknown method(s) {stray}; pass e.g. ig={{'n_steps': 32}}")
    if model.training:
        raise ValueError("the model is in training mode (dropout and batch statistics would make "
                         "maps random); call model.eval() first")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 2 or not np.isfinite(pixels).all():
        raise ValueError(f"expected a finite (H, W) scan, got shape {pixels.shape}")

    device = _model_device(model)
    x = to_model_input(pixels, preprocess)[None].to(device)  # (1, 1, S, S)
    ctx = AttributionContext.from_preprocess(preprocess)
    shape = display_shape(pixels.shape, max_side)
    shown_pixels = shrink(pixels, shape)
    results: dict[str, Explanation] = {}
    input_maps: dict[str, torch.Tensor] = {}

    def run(name: str, target: int) -> RawAttribution:
        t0 = time.perf_counter()
        r = compute(model, x, name, target, ctx=ctx, **dict(method_options.get(name, {})))
        shown = display_map(r)
        heat = normalize_map(upsample_map(shown, shape))
        results[name] = Explanation(
            method=name, target=target, map=heat, raw=r.raw.numpy().astype(np.float32),
            overlay=overlay(shown_pixels, heat, opacity=opacity, cmap=cmap), seconds=time.perf_counter() - t0,
            extras=r.extras, signed=r.signed)
        input_maps[name] = torch.from_numpy(upsample_map(shown, tuple(x.shape[-2:])))
        return r

    if "rollout" in methods:
        # Rollout is class-agnostic and its capture pass is a full forward pass: its logits
        # are the prediction (the unfused path computes the same function as the fused one).
        logits = run("rollout", -1 if target is None else int(target)).logits
        assert logits is not None
    else:
        with torch.no_grad():
            logits = model(x).float()[0]  # (K,)
    logits = logits.cpu()
    probs = torch.softmax(logits / temperature, dim=-1)
    if target is None:
        target = int(probs.argmax())
    if not 0 <= int(target) < logits.shape[0]:
        raise ValueError(f"target class {target} is outside 0..{logits.shape[0] - 1}")
    target = int(target)

    if "rollout" in results:
        results["rollout"].target = target
    for name in methods:
        if name not in results:
            run(name, target)
    results = {name: results[name] for name in methods}  # the order asked for

    faith_seconds = 0.0
    if faithfulness:
        t0 = time.perf_counter()
        s = tuple(x.shape[-2:])
        rand = random_maps(s, range(random_seeds))
        baseline = ctx.baseline(x)
        start = blur(x, sigma=s[-1] / 8)
        maps = [input_maps[name] for name in methods]
        curves = deletion_insertion(model, x, maps + rand, target, baseline=baseline, start=start,
                                    steps=faithfulness_steps, patch=faithfulness_patch or _token_stride(model, s),
                                    temperature=temperature)
        rand_curves = curves[len(maps):]
        rand_del = float(np.mean([d.auc for d, _ in rand_curves])) if rand_curves else float("nan")
        rand_ins = float(np.mean([i.auc for _, i in rand_curves])) if rand_curves else float("nan")
        for name, (d, i) in zip(methods, curves):
            results[name].faithfulness = {"deletion_auc": d.auc, "insertion_auc": i.auc,
                                          "random_deletion_auc": rand_del, "random_insertion_auc": rand_ins}
        faith_seconds = time.perf_counter() - t0

    return ExplanationSet(target=target, probabilities=probs.cpu().numpy(), logits=logits.cpu().numpy(),
                          explanations=results, faithfulness_seconds=faith_seconds)
