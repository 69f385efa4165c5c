"""What a decoded scan is: pixels in display convention plus what was done to get them.

:func:`load_scan` (in :mod:`lungvit.core.io.ingest`) is the only way files become scans.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lungvit.core.io.pixel_math import range_window


@dataclass
class ScanMetadata:
    """Everything LungViT knows and did while decoding one file (no PHI by default).

    Attributes:
        source_format: "dicom", "png" or "jpeg".
        name: file name as given (never a full path).
        modality: DICOM Modality (e.g. "CR", "DX", "OPT"), None for PNG/JPEG.
        photometric_interpretation: as stored ("MONOCHROME1", "RGB", "L", "I;16", ...).
        bits_stored: significant bits per sample of the stored pixels.
        rescale: the Modality LUT applied, e.g. {"kind": "linear", "slope": 1.0,
            "intercept": -1024.0} or {"kind": "lut_sequence", "entries": 4096}; None if none.
        window: the VOI transform applied, e.g. {"kind": "window", "center": 40.0,
            "width": 400.0, "function": "LINEAR"}, {"kind": "voi_lut", ...},
            {"kind": "percentile", "low": ..., "high": ...} or {"kind": "minmax", ...}.
        inverted: True when MONOCHROME1 was inverted to display convention.
        frame_used: index of the frame decoded (0 for single-frame files).
        number_of_frames: frames in the file.
        original_shape: (rows, columns) of the decoded frame.
        resolution_level: 0 when the pixels are the frame at full size; ``r`` when a JPEG
            2000 frame was decoded at its resolution level ``r`` (each side halved ``r``
            times, rounded up), as ``load_scan(min_side=...)`` allows.
        pixel_spacing: (row, column) spacing in mm, if known.
        view_position: DICOM ViewPosition (e.g. "PA"), if present.
        body_part: DICOM BodyPartExamined, if present.
        transfer_syntax: DICOM transfer syntax name, if DICOM.
        sop_class: DICOM SOP Class name, if DICOM.
        patient_key: one-way hash of the patient identifier, for patient-level splits.
        color_saturation: mean chroma (0..1) of a colour source before it was turned to
            luminance; None for grayscale sources. Used to flag photos as out of scope.
        warnings: human-readable notes about anything unusual that was done.
        phi: identifying attributes, only when explicitly requested; otherwise None.
    """

    source_format: str
    name: str | None = None
    modality: str | None = None
    photometric_interpretation: str | None = None
    bits_stored: int | None = None
    rescale: dict[str, Any] | None = None
    window: dict[str, Any] | None = None
    inverted: bool = False
    frame_used: int = 0
    number_of_frames: int = 1
    original_shape: tuple[int, int] = (0, 0)
    resolution_level: int = 0
    pixel_spacing: tuple[float, float] | None = None
    view_position: str | None = None
    body_part: str | None = None
    transfer_syntax: str | None = None
    sop_class: str | None = None
    patient_key: str | None = None
    color_saturation: float | None = None
    warnings: list[str] = field(default_factory=list)
    phi: dict[str, str] | None = None

    @property
    def is_hounsfield(self) -> bool:
        """Whether the values are Hounsfield units (CT modality or an HU rescale), so the CT
        windows of :data:`~lungvit.core.io.pixel_math.CT_WINDOWS` apply."""
        rescale_type = str((self.rescale or {}).get("type", "")).upper()
        return (self.modality or "").upper() == "CT" or rescale_type == "HU"

    def window_numbers(self) -> tuple[float | None, float | None]:
        """The (center, width) the scan was displayed with; (None, None) when the window
        was a lookup table (no single pair describes it) or none is recorded."""
        w = self.window or {}
        if "center" in w and "width" in w:
            return float(w["center"]), float(w["width"])
        if "low" in w and "high" in w:
            return range_window(float(w["low"]), float(w["high"]))
        return None, None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["original_shape"] = list(self.original_shape)
        if self.pixel_spacing is not None:
            d["pixel_spacing"] = list(self.pixel_spacing)
        return d


@dataclass
class Scan:
    """A decoded scan.

    Attributes:
        pixels: (H, W) float32 in [0, 1], display convention (air dark on X-rays).
        meta: what was read and done.
    """

    pixels: np.ndarray
    meta: ScanMetadata
