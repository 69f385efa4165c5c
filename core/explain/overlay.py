"""Colour maps and overlays on numpy arrays.

The colour maps are matplotlib's own perceptually uniform ``inferno`` and ``viridis``
(``matplotlib.colormaps``; imported on first use, so importing this module stays light).
Overlays look colours up in a 1,024-level table of the map.
"""
from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.colors import Colormap

COLORMAPS = ("inferno", "viridis")


def colormap(values: np.ndarray, name: str = "inferno") -> np.ndarray:
    """Map values in [0, 1] to RGB floats in [0, 1] (matplotlib's colour map ``name``).

    Args:
        values: any shape; values outside [0, 1] are clipped, NaN maps to 0.
        name: "inferno" or "viridis".

    Returns:
        ``values.shape + (3,)`` float32.
    """
    cmap = _cmap(name)
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    return cmap(v)[..., :3].astype(np.float32)


@cache
def _cmap(name: str) -> Colormap:
    """matplotlib's colour map ``name`` (ValueError for a map LungViT does not offer)."""
    if name not in COLORMAPS:
        raise ValueError(f"unknown colour map {name!r}; choose from {', '.join(COLORMAPS)}")
    import matplotlib  # a required dependency, imported here only to keep imports light

    cmap = matplotlib.colormaps[name]  # a copy of the registered map, ours alone
    cmap(0.0)  # builds its table now: the lazy build on first call is not thread-safe
    return cmap


def normalize_map(m: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] as float32; a constant (or empty) map becomes all zeros.

    NaN and infinities count as 0. The arithmetic is float32 (a 512 x 512 map is scaled
    in about a millisecond); the range is measured in float64.
    """
    a = np.asarray(m, dtype=np.float32)
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros(a.shape, dtype=np.float32)
    out = np.subtract(a, np.float32(lo), dtype=np.float32)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def overlay(scan: np.ndarray, heatmap: np.ndarray, *, opacity: float = 0.5, cmap: str = "inferno",
            weighted: bool = False) -> np.ndarray:
    """Draw a [0, 1] map over a grayscale scan.

    Args:
        scan: (H, W) pixels in [0, 1].
        heatmap: (H, W) map in [0, 1], aligned with ``scan``.
        opacity: 0 shows the scan alone, 1 the colour map alone.
        cmap: "inferno" or "viridis".
        weighted: scale the opacity by the map, so unattributed regions show the scan.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity}")
    s = np.clip(np.nan_to_num(np.asarray(scan, dtype=np.float32)), 0.0, 1.0)
    h = np.asarray(heatmap, dtype=np.float32)
    if s.ndim != 2 or s.shape != h.shape:
        raise ValueError(f"scan {s.shape} and map {h.shape} must be the same (H, W) shape")
    h = np.clip(np.nan_to_num(h), 0.0, 1.0)
    idx = np.rint(h * (_LUT_SIZE - 1)).astype(np.intp)
    color = np.take(_lut(cmap), idx, axis=0)  # (H, W, 3) float32, 0..255 (a fresh array)
    gray = s * np.float32(255.0)  # (H, W)
    # In place on the (H, W, 3) array: a 512 x 512 overlay is a few milliseconds.
    if weighted:
        alpha = (np.float32(opacity) * h)[..., None]
        color -= gray[..., None]
        color *= alpha
        color += gray[..., None]
    else:
        color *= np.float32(opacity)
        color += (np.float32(1.0 - opacity) * gray)[..., None]
    np.rint(color, out=color)
    return np.clip(color, 0, 255, out=color).astype(np.uint8)


_LUT_SIZE = 1024


@cache
def _lut(name: str) -> np.ndarray:
    """matplotlib's colour map sampled at 1,024 levels, as float32 0..255 (read-only)."""
    lut = colormap(np.linspace(0.0, 1.0, _LUT_SIZE), name) * np.float32(255.0)
    lut.setflags(write=False)
    return lut
