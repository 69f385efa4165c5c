"""Pure pixel transforms shared by the DICOM and PNG/JPEG readers.

Everything here maps arrays to arrays (float32, display range [0, 1]) and knows nothing
about files, so the readers stay thin and the maths can be tested on its own.
"""
from __future__ import annotations

import numpy as np

# ITU-R BT.601 luma weights (the Y of DICOM's YBR_FULL and of JPEG/JFIF).
BT601 = (0.299, 0.587, 0.114)
# Mean chroma below which a colour-coded image is grey in fact (a grey picture stored as
# RGB, or YBR with JPEG's rounding): converting it to luminance changes nothing visible,
# so no note is made.
GREY_SATURATION = 0.02

# Percentiles of the fallback window when a file carries none (PS3.3 leaves it to the
# viewer; 0.5/99.5 ignores burnt-in labels and collimator edges on radiographs).
ROBUST_LOW_PCT = 0.5
ROBUST_HIGH_PCT = 99.5

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
# Windows a caller may ask for by name, computed from the image's own values:
# "auto" spans the 0.5-99.5 percentiles, "minmax" every value.
WINDOW_RANGES = ("auto", "minmax")
# The classic CT windows, (center, width) in Hounsfield units: the same on every CT
# scanner, and meaningless for values that are not HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "CT lung": (-600.0, 1500.0), "CT mediastinum": (40.0, 400.0), "CT bone": (400.0, 1800.0)}

_BINCOUNT_MAX_RANGE = 1 << 22  # integer ranges up to 4 Mi values use an exact histogram
_SAMPLE_TARGET = 1 << 20  # float data: percentiles of a strided sample of ~1 Mi pixels


def luminance(rgb: np.ndarray, full_scale: float) -> tuple[np.ndarray, float]:
    """Turn an (H, W, 3) colour image into BT.601 luminance.

    Args:
        rgb: (H, W, 3) samples in 0..``full_scale``.
        full_scale: the largest possible sample value (255 for 8-bit).

    Returns:
        (H, W) float32 luminance in the same units, and the mean chroma
        (max(R,G,B) - min(R,G,B), averaged over pixels) as a fraction of full scale:
        0 for a grey picture stored as RGB, about 0.2 or more for a colour photograph.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) samples, got shape {rgb.shape}")
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = r * np.float32(BT601[0])
    y += g * np.float32(BT601[1])
    y += b * np.float32(BT601[2])
    chroma = np.maximum(np.maximum(r, g), b)
    chroma -= np.minimum(np.minimum(r, g), b)
    saturation = float(chroma.mean(dtype=np.float64) / full_scale) if chroma.size else 0.0
    return y, min(max(saturation, 0.0), 1.0)


def robust_range(arr: np.ndarray, low_pct: float = ROBUST_LOW_PCT,
                 high_pct: float = ROBUST_HIGH_PCT) -> tuple[float, float]:
    """The (low, high) percentiles of ``arr``, fast on large images.

    Integer images (all stored DICOM/PNG pixels) use an exact histogram; float images use
    a deterministic strided sample of about a million pixels.
    """
    flat = np.asarray(arr).ravel()
    if flat.size == 0:
        return 0.0, 0.0
    if np.issubdtype(flat.dtype, np.integer):
        lo_v, hi_v = int(flat.min()), int(flat.max())
        if hi_v - lo_v < _BINCOUNT_MAX_RANGE:
            counts = np.bincount((flat.astype(np.int64) - lo_v), minlength=hi_v - lo_v + 1)
            cdf = np.cumsum(counts)
            total = cdf[-1]
            lo_i = int(np.searchsorted(cdf, total * low_pct / 100.0, side="right"))
            hi_i = int(np.searchsorted(cdf, total * high_pct / 100.0, side="left"))
            return float(lo_v + min(lo_i, hi_v - lo_v)), float(lo_v + min(hi_i, hi_v - lo_v))
    step = max(1, flat.size // _SAMPLE_TARGET)
    sample = flat[::step].astype(np.float64)
    lo, hi = np.percentile(sample, [low_pct, high_pct])
    return float(lo), float(hi)


def _float_work(x: np.ndarray, inplace: bool) -> np.ndarray:
    """A float32 array to compute in: ``x`` itself when allowed, else a new one."""
    if inplace and x.dtype == np.float32 and x.flags.writeable:
        return x
    return np.array(x, dtype=np.float32)


def scale_range(x: np.ndarray, low: float, high: float, *, inplace: bool = False) -> np.ndarray:
    """Map ``low``..``high`` linearly onto 0..1, clipping outside; float32 out.

    A degenerate range (``high <= low``: a blank image) maps everything to 0. With
    ``inplace`` a writeable float32 ``x`` is overwritten instead of copied.
    """
    out = _float_work(x, inplace)
    if not high > low:
        out.fill(0.0)
        return out
    out -= np.float32(low)
    out /= np.float32(high - low)  # a true division: 8-bit v/255 comes out exact
    return np.clip(out, 0.0, 1.0, out=out)


def apply_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR",
                 *, inplace: bool = False) -> np.ndarray:
    """Apply a DICOM VOI window, output in [0, 1] (PS3.3 C.11.2.1.2 and C.11.2.1.3).

    Args:
        x: values after the Modality LUT (e.g. Hounsfield units or stored values).
        center, width: Window Center (0028,1050) and Window Width (0028,1051).
        function: VOI LUT Function (0028,1056): "LINEAR" (the default, with the
            standard's half-unit offsets), "LINEAR_EXACT" or "SIGMOID".
        inplace: overwrite a writeable float32 ``x`` instead of copying it.

    Returns:
        float32 array in [0, 1] (0 is the darkest display value before any inversion).

    Raises:
        ValueError: unknown function, or a width the standard does not allow
            (< 1 for LINEAR, <= 0 otherwise).
    """
    function = function.upper()
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"window width {width} is below 1, which LINEAR does not allow")
        c, w = center - 0.5, width - 1.0
        if w == 0:  # a one-value-wide window is a threshold
            return (np.asarray(x) > c).astype(np.float32)
    elif function in ("LINEAR_EXACT", "SIGMOID"):
        if width <= 0:
            raise ValueError(f"window width {width} must be above 0 for {function}")
        c, w = center, width
    else:
        raise ValueError(f"unknown VOI LUT function {function!r}")
    out = _float_work(x, inplace)
    out -= np.float32(c)
    if function == "SIGMOID":
        # y = 1 / (1 + exp(-4 (x - c) / w))
        out *= np.float32(-4.0 / w)
        np.clip(out, -80.0, 80.0, out=out)  # exp stays finite in float32
        np.exp(out, out=out)
        out += 1.0
        return np.reciprocal(out, out=out)
    # Both linear forms reduce to (x - c) / w + 0.5 clipped to [0, 1]: the standard's
    # "x <= c - w/2 -> min" and "x > c + w/2 -> max" are exactly where the line leaves it.
    out /= np.float32(w)
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def fraction_at_extremes(y: np.ndarray) -> tuple[float, float]:
    """Fractions of pixels at 0 and at 1 (a window that blanks the image), estimated on a
    strided sample of about a million pixels: it only decides whether to warn."""
    flat = np.asarray(y).ravel()
    sample = flat[::max(1, flat.size // _SAMPLE_TARGET)]
    n = max(sample.size, 1)
    return (float(np.count_nonzero(sample <= 0.0)) / n,
            float(np.count_nonzero(sample >= 1.0)) / n)


def range_window(low: float, high: float) -> tuple[float, float]:
    """The LINEAR (center, width) that maps ``low`` to black and ``high`` to white
    (PS3.3 C.11.2.1.2: y = (x - (c - 0.5)) / (w - 1) + 0.5)."""
    return (low + high) / 2.0 + 0.5, max(high - low + 1.0, 1.0)


def value_range(values: np.ndarray, kind: str) -> tuple[float, float]:
    """The (low, high) of an image's values that a named window spans.

    Args:
        values: the image's values (after any Modality LUT).
        kind: "auto" (the 0.5-99.5 percentiles; the full range when more than 99% of
            the pixels share a value) or "minmax".

    Returns:
        (low, high); equal for a blank image.
    """
    if kind not in WINDOW_RANGES:
        raise ValueError(f"unknown window {kind!r}; choose from {', '.join(WINDOW_RANGES)}")
    if kind == "auto":
        low, high = robust_range(values)
        if high > low:
            return low, high
    flat = np.asarray(values)
    return (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)


def resolve_window(window: tuple[float, float] | str | None, values: np.ndarray,
                   notes: list[str]) -> tuple[tuple[float, float] | None, str | None]:
    """A caller's window as (center, width), computed from ``values`` when it is named.

    Args:
        window: (center, width), one of :data:`WINDOW_RANGES`, or None (the file's own).
        values: the image's values after any Modality LUT, before the VOI.
        notes: a note is appended when a named window cannot be applied.

    Returns:
        ((center, width) or None, the name of the range used or None). A named window
        on a blank image gives None: the file's own window is kept (with a note).
    """
    if not isinstance(window, str):
        return window, None
    low, high = value_range(values, window)
    if not high > low:
        notes.append("every pixel has the same value; the file's own window was kept")
        return None, None
    return range_window(low, high), window


def window_info(window: tuple[float, float], kind: str | None) -> dict[str, object]:
    """``meta.window`` for a caller's window (``kind``: the named range it came from)."""
    info: dict[str, object] = {"kind": "window", "center": float(window[0]),
                               "width": float(window[1]), "function": "LINEAR",
                               "source": "override"}
    if kind is not None:
        info["range"] = kind
    return info


def colour_note(kind: str, saturation: float) -> str | None:
    """The note on turning a colour image into luminance; None when it was grey anyway."""
    if saturation < GREY_SATURATION:
        return None
    return (f"a colour image ({kind}) was converted to grayscale by luminance (mean colour "
            f"saturation {saturation:.2f})")
