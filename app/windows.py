"""Display windows that suit the scan's modality, resolved to the (center, width) that
:func:`lungvit.core.ingest.load_scan` takes.

CT stores Hounsfield units, so its classic presets (lung, mediastinum, bone) mean the same
on every CT scanner; X-ray (CR/DX), OCT and PNG/JPEG values do not, so those scans get
presets computed from the file itself: its own window (VOI), a robust percentile window,
or the full range of its values. Either way the result is a plain (center, width) in the
file's values after the Modality LUT, so the one preprocessing path of ``core`` is kept:
the app only chooses the window it asks for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lungvit.core import pixel_math
from lungvit.core.errors import LungViTError
from lungvit.core.ingest import load_scan
from lungvit.core.scan import Scan, ScanMetadata

FILE = "File's own window (VOI)"
AUTO = "Auto (0.5-99.5 percentile)"
FULL = "Full range (min-max)"
CUSTOM = "Custom"
# (center, width) in Hounsfield units: meaningful for CT only.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "CT lung": (-600.0, 1500.0), "CT mediastinum": (40.0, 400.0), "CT bone": (400.0, 1800.0)}
GENERAL = [FILE, AUTO, FULL]


class WindowError(LungViTError, ValueError):
    """A window the user asked for that cannot be applied (the message says why)."""


@dataclass
class Windowed:
    """A scan read with a chosen window.

    Attributes:
        scan: the scan, read through ``load_scan`` with ``window``.
        window: the (center, width) passed to ``load_scan``; None: the file's own.
        preset: the preset actually used (a CT preset on a non-CT scan falls back).
        notes: what the user should know about the choice.
    """

    scan: Scan
    window: tuple[float, float] | None
    preset: str
    notes: list[str] = field(default_factory=list)


def is_ct(meta: ScanMetadata) -> bool:
    """Whether the scan's values are Hounsfield units (CT modality or an HU rescale)."""
    rescale_type = str((meta.rescale or {}).get("type", "")).upper()
    return (meta.modality or "").upper() == "CT" or rescale_type == "HU"


def presets_for(meta: ScanMetadata | None) -> list[str]:
    """The presets that make sense for a scan (all general ones before any is read)."""
    if meta is not None and is_ct(meta):
        return [FILE, *CT_PRESETS, AUTO, FULL, CUSTOM]
    return [*GENERAL, CUSTOM]


def range_window(low: float, high: float) -> tuple[float, float]:
    """The LINEAR (center, width) that maps ``low`` to black and ``high`` to white
    (PS3.3 C.11.2.1.2: y = (x - (c - 0.5)) / (w - 1) + 0.5)."""
    return (low + high) / 2.0 + 0.5, max(high - low + 1.0, 1.0)


def numbers_of(meta: ScanMetadata) -> tuple[float | None, float | None]:
    """The (center, width) the scan was shown with, for the level/width boxes; blanks when
    the file's window is a lookup table (no single pair describes it)."""
    w = meta.window or {}
    if "center" in w and "width" in w:
        return round(float(w["center"]), 1), round(float(w["width"]), 1)
    if "low" in w and "high" in w:
        c, width = range_window(float(w["low"]), float(w["high"]))
        return round(c, 1), round(width, 1)
    return None, None


def _probe_span(meta: ScanMetadata) -> tuple[float, float]:
    """A range surely holding every value after the Modality LUT (signed or not)."""
    bits = min(max(int(meta.bits_stored or 16), 1), 16)
    lo, hi = -float(1 << bits), float(1 << bits)
    rescale = meta.rescale or {}
    if rescale.get("kind") == "linear":
        a = lo * float(rescale["slope"]) + float(rescale["intercept"])
        b = hi * float(rescale["slope"]) + float(rescale["intercept"])
        lo, hi = min(a, b), max(a, b)
    elif rescale.get("kind") == "lut_sequence":
        lo, hi = 0.0, float(1 << min(int(rescale.get("bits", 16)), 16))
    return lo, hi


def value_range(path: Path, meta: ScanMetadata, kind: str) -> tuple[float, float]:
    """The percentile or min-max range of the scan's values after the Modality LUT.

    The file is read once more through ``load_scan`` with a window spanning every value
    it could hold, so the display values are a known linear map of the stored ones
    (float32 keeps ~1e-7 of that span: far below one stored level) and are mapped back.

    Args:
        path: the scan file.
        meta: its metadata from a first read (bits stored, rescale).
        kind: "percentile" or "minmax".

    Returns:
        (low, high) in the file's values.
    """
    lo, hi = _probe_span(meta)
    center, width = range_window(lo, hi)
    probe = load_scan(path, window=(center, width))
    y = probe.pixels if not probe.meta.inverted else 1.0 - probe.pixels  # undo MONOCHROME1
    if kind == "percentile":
        a, b = pixel_math.robust_range(y)
        if not b > a:
            a, b = float(y.min()), float(y.max())
    else:
        a, b = float(y.min()), float(y.max())
    return lo + a * (hi - lo), lo + b * (hi - lo)


def load_windowed(path: Path, preset: str, center: float | None, width: float | None,
                  *, include_phi: bool = False) -> Windowed:
    """Read a scan with the window a preset (or Custom with its numbers) stands for.

    Args:
        path: the scan file.
        preset: one of :func:`presets_for`'s names.
        center / width: the Custom window (ignored by other presets).
        include_phi: copy identifying DICOM attributes into the metadata.

    Returns:
        A :class:`Windowed`.

    Raises:
        WindowError: Custom without a level and a width of at least 1.
        ScanReadError: the file cannot be read.
    """
    if preset == CUSTOM:
        if center is None or width is None or not math.isfinite(center) or not (
                math.isfinite(width) and width >= 1):
            raise WindowError("Custom window: give a level and a width of at least 1")
        window = (float(center), float(width))
        return Windowed(load_scan(path, window=window, include_phi=include_phi), window, preset)
    if preset in CT_PRESETS:
        # Read with the preset at once: the UI offers CT presets only for CT scans, so the
        # re-read with the file's own window is the rare case (an API call).
        window = CT_PRESETS[preset]
        scan = load_scan(path, window=window, include_phi=include_phi)
        if is_ct(scan.meta):
            return Windowed(scan, window, preset)
        first = load_scan(path, include_phi=include_phi)
        modality = first.meta.modality or first.meta.source_format.upper()
        return Windowed(first, None, FILE, [
            f"the {preset} preset is in Hounsfield units, for CT; this {modality} scan is "
            "shown with its own window"])
    first = load_scan(path, include_phi=include_phi)
    if preset in (AUTO, FULL):
        low, high = value_range(path, first.meta, "percentile" if preset == AUTO else "minmax")
        if not high > low:
            return Windowed(first, None, FILE, ["every pixel has the same value; the file's "
                                                "own window was kept"])
        window = range_window(low, high)
        return Windowed(load_scan(path, window=window, include_phi=include_phi), window,
                        preset)
    return Windowed(first, None, FILE)
