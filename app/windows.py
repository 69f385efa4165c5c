"""Display windows that suit the scan's modality, resolved to the (center, width) that
:func:`lungvit.core.io.ingest.load_scan` takes.

CT stores Hounsfield units, so its classic presets (lung, mediastinum, bone) mean the same
on every CT scanner; X-ray (CR/DX), OCT and PNG/JPEG values do not, so those scans get
presets computed from the file itself: its own window (VOI), a robust percentile window,
or the full range of its values. Core computes those (``load_scan(window="auto")``,
``"minmax"``) in the one decode and applies them as a plain (center, width) in the file's
values after the Modality LUT, so the one preprocessing path of ``core`` is kept: the app
only chooses the window it asks for.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lungvit.core.errors import LungViTError
from lungvit.core.io.ingest import load_scan
from lungvit.core.io.pixel_math import CT_WINDOWS
from lungvit.core.io.scan import Scan, ScanMetadata

FILE = "File's own window (VOI)"
AUTO = "Auto (0.5-99.5 percentile)"
FULL = "Full range (min-max)"
CUSTOM = "Custom"
# (center, width) in Hounsfield units, core's: meaningful for CT only.
CT_PRESETS = CT_WINDOWS
GENERAL = [FILE, AUTO, FULL]
# The presets that core computes from the image itself (load_scan's named windows).
NAMED = {AUTO: "auto", FULL: "minmax"}
# Decodes a scan file: read(path, window=..., include_phi=...) -> Scan.
Reader = Callable[..., Scan]


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


def presets_for(meta: ScanMetadata | None) -> list[str]:
    """The presets that make sense for a scan (all general ones before any is read)."""
    if meta is not None and meta.is_hounsfield:
        return [FILE, *CT_PRESETS, AUTO, FULL, CUSTOM]
    return [*GENERAL, CUSTOM]


def numbers_of(meta: ScanMetadata) -> tuple[float | None, float | None]:
    """The (center, width) the scan was shown with, rounded for the level/width boxes;
    blanks when the file's window is a lookup table (no single pair describes it)."""
    center, width = meta.window_numbers()
    if center is None or width is None:
        return None, None
    return round(center, 1), round(width, 1)


def load_windowed(path: Path, preset: str, center: float | None, width: float | None,
                  *, include_phi: bool = False, read: Reader | None = None) -> Windowed:
    """Read a scan with the window a preset (or Custom with its numbers) stands for.

    The window maths is core's (``load_scan(window="auto" | "minmax" | (c, w))``): each
    preset is one decode. Only a Hounsfield preset asked of a scan that turns out not to
    be CT needs a second one, with the file's own window.

    Args:
        path: the scan file.
        preset: one of :func:`presets_for`'s names.
        center / width: the Custom window (ignored by other presets).
        include_phi: copy identifying DICOM attributes into the metadata.
        read: decodes ``read(path, window=..., include_phi=...)``; default ``load_scan``
            (the app passes its :class:`~lungvit.app.scans.ScanCache`).

    Returns:
        A :class:`Windowed`.

    Raises:
        WindowError: Custom without a level and a width of at least 1.
        ScanReadError: the file cannot be read.
    """
    read = read or load_scan
    if preset == CUSTOM:
        if center is None or width is None or not math.isfinite(center) or not (
                math.isfinite(width) and width >= 1):
            raise WindowError("Custom window: give a level and a width of at least 1")
        window = (float(center), float(width))
        return Windowed(read(path, window=window, include_phi=include_phi), window, preset)
    if preset in CT_PRESETS:
        # Read with the preset at once: the UI offers CT presets only for CT scans, so the
        # re-read with the file's own window is the rare case (an API call).
        window = CT_PRESETS[preset]
        scan = read(path, window=window, include_phi=include_phi)
        if scan.meta.is_hounsfield:
            return Windowed(scan, window, preset)
        first = read(path, include_phi=include_phi)
        modality = first.meta.modality or first.meta.source_format.upper()
        return Windowed(first, None, FILE, [
            f"the {preset} preset is in Hounsfield units, for CT; this {modality} scan is "
            "shown with its own window"])
    if preset in (AUTO, FULL):
        scan = read(path, window=NAMED[preset], include_phi=include_phi)
        w = scan.meta.window or {}
        if w.get("range") != NAMED[preset]:  # a blank image: core kept the file's window
            return Windowed(scan, None, FILE)
        return Windowed(scan, (float(w["center"]), float(w["width"])), preset)
    return Windowed(read(path, include_phi=include_phi), None, FILE)
