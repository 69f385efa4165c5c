"""DICOM stored values to display pixels (PS3.3 C.11, PS3.4 N.2): the maths after decoding.

:func:`gray_to_display` runs Modality LUT -> VOI -> MONOCHROME1 inversion -> [0, 1];
:func:`color_to_display` turns RGB / YBR / PALETTE COLOR into BT.601 luminance. Split
from :mod:`lungvit.core.io.dicom` (file parsing, safety checks, frame decoding).

LUT tables are read here rather than through ``pydicom.pixels.apply_voi`` and
``apply_modality_lut`` because LungViT needs (a) rounding, not truncation, of rescaled
float inputs before the lookup, (b) the table's declared and used bit depth to normalise
its output to [0, 1], and (c) a Descriptor whose entry count was read as a signed SS not
to turn negative. Windows are computed by :func:`lungvit.core.io.pixel_math.apply_window`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut

from lungvit.core.io import pixel_math
from lungvit.core.errors import CorruptFileError, UnsupportedImageError
from lungvit.core.io.scan import ScanMetadata


def gray_to_display(stored: np.ndarray, ds: Dataset, meta: ScanMetadata,
                    window: tuple[float, float] | str | None, notes: list[str]) -> np.ndarray:
    """Modality LUT -> VOI -> MONOCHROME1 inversion -> [0, 1] float32.

    Args:
        stored: the decoded (H, W) frame, as stored.
        ds: its dataset (Modality LUT, VOI LUT and Presentation LUT attributes).
        meta: filled in: rescale, window, inverted (photometric_interpretation is read).
        window: a caller's (center, width) that replaces the file's VOI.
        notes: warnings are appended here.

    Returns:
        (H, W) float32 in [0, 1], air dark.
    """
    values, meta.rescale = modality_transform(stored, ds, notes)
    y, meta.window = voi_transform(stored, values, meta.rescale, ds, window, notes)
    photometric = meta.photometric_interpretation
    shape = str(safe_get(ds, "PresentationLUTShape") or "").strip().upper()
    meta.inverted = photometric == "MONOCHROME1"
    if photometric == "MONOCHROME2" and shape == "INVERSE":
        meta.inverted = True
        notes.append("the Presentation LUT Shape is INVERSE; the image was inverted")
    if meta.inverted:
        np.subtract(1.0, y, out=y)
    return y


def color_to_display(arr: np.ndarray, ds: Dataset, photometric: str, photometric_out: str,
                     meta: ScanMetadata, window: tuple[float, float] | str | None,
                     label: str,
                     notes: list[str]) -> np.ndarray:
    """RGB / YBR / PALETTE COLOR -> BT.601 luminance in [0, 1] float32.

    Args:
        arr: the decoded frame: (H, W, 3), or (H, W) palette indices.
        ds: its dataset (the palette, for PALETTE COLOR).
        photometric / photometric_out: as stored, and as the decoder returned it (YBR
            data comes back as RGB).
        meta: filled in: color_saturation, window (bits_stored is read).
        window: a caller's (center, width) in luminance units, "auto" / "minmax", or None
            for full range.
        label / notes: for messages and warnings.

    Returns:
        (H, W) float32 in [0, 1].
    """
    if photometric == "PALETTE COLOR":
        if arr.ndim != 2:
            raise CorruptFileError(f"{label} is PALETTE COLOR with more than one sample per pixel")
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:  # a missing or malformed palette
            raise CorruptFileError(f"{label}: its colour palette cannot be read") from exc
        full = 255.0 if arr.dtype == np.uint8 else 65535.0
    else:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise CorruptFileError(f"{label} is labelled {photometric} but does not hold "
                                   "three samples per pixel")
        if photometric_out.startswith("YBR"):
            raise UnsupportedImageError(f"{label}: {photometric_out} colour data could not "
                                        "be converted to RGB")
        full = float((1 << meta.bits_stored) - 1)
    gray, meta.color_saturation = pixel_math.luminance(arr, full)
    if note := pixel_math.colour_note(photometric, meta.color_saturation):
        notes.append(note)
    window, named = pixel_math.resolve_window(window, gray, notes)
    if window is not None:
        meta.window = pixel_math.window_info(window, named)
        return pixel_math.apply_window(gray, window[0], window[1], inplace=True)
    meta.window = {"kind": "full_range", "low": 0.0, "high": full}
    return pixel_math.scale_range(gray, 0.0, full, inplace=True)


def modality_transform(stored: np.ndarray, ds: Dataset,
                       notes: list[str]) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Apply the Modality LUT: Rescale Slope/Intercept or the Modality LUT Sequence.

    Returns:
        The values in modality units (float32 for a rescale; the LUT's integers for a
        LUT Sequence) and a description of what was applied (None for the identity).
    """
    item = _first_item(ds, "ModalityLUTSequence")
    lut = lut_table(item, ds, notes, "Modality LUT") if item is not None else None
    if lut is not None:
        table, first, bits = lut
        return lookup(stored, table, first), {
            "kind": "lut_sequence", "entries": int(table.size), "first_mapped": first,
            "bits": bits}
    slope = _number(safe_get(ds, "RescaleSlope"))
    intercept = _number(safe_get(ds, "RescaleIntercept"))
    if slope == 0.0:
        notes.append("the Rescale Slope is 0, which would erase the image; it was ignored")
        slope = None
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    values = stored.astype(np.float32)
    if slope == 1.0 and intercept == 0.0:
        return values, None
    values *= np.float32(slope)
    values += np.float32(intercept)
    rescale: dict[str, Any] = {"kind": "linear", "slope": slope, "intercept": intercept}
    if rescale_type := str(safe_get(ds, "RescaleType") or "").strip():
        rescale["type"] = rescale_type
    return values, rescale


def voi_transform(stored: np.ndarray, values: np.ndarray, rescale: dict[str, Any] | None,
                  ds: Dataset, window: tuple[float, float] | str | None,
                  notes: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply the VOI stage; returns [0, 1] float32 (before any inversion) and what was done.

    Precedence: the caller's ``window`` override ((center, width), or "auto" / "minmax"
    computed from ``values``), the VOI LUT Sequence, the first Window
    Center/Width, then a robust percentile window (with a note).
    """
    window, named = pixel_math.resolve_window(window, values, notes)
    if window is not None:
        center, width = float(window[0]), float(window[1])
        return (pixel_math.apply_window(values, center, width, "LINEAR", inplace=True),
                pixel_math.window_info((center, width), named))
    item = _first_item(ds, "VOILUTSequence")
    lut = lut_table(item, ds, notes, "VOI LUT") if item is not None else None
    if lut is not None:
        table, first, bits = lut
        full = _lut_full_scale(table, bits, notes)
        y = lookup(values, table, first).astype(np.float32)
        y *= np.float32(1.0 / full)
        np.clip(y, 0.0, 1.0, out=y)
        _note_if_blank(y, "VOI LUT", notes)
        return y, {"kind": "voi_lut", "entries": int(table.size), "first_mapped": first,
                   "bits": bits, "output_max": full}
    centers, widths = numbers(safe_get(ds, "WindowCenter")), numbers(safe_get(ds, "WindowWidth"))
    if centers and widths:
        function = str(safe_get(ds, "VOILUTFunction") or "LINEAR").strip().upper()
        if function not in pixel_math.VOI_FUNCTIONS:
            notes.append(f"unknown VOI LUT Function {function!r}; LINEAR was used")
            function = "LINEAR"
        try:
            y = pixel_math.apply_window(values, centers[0], widths[0], function, inplace=True)
        except ValueError:
            notes.append(f"the file's window width ({widths[0]:g}) is not valid for "
                         f"{function}; it was ignored")
        else:
            info = {"kind": "window", "center": centers[0], "width": widths[0],
                    "function": function, "source": "file"}
            if len(centers) > 1:
                notes.append(f"the file offers {len(centers)} window presets; the first "
                             f"(centre {centers[0]:g}, width {widths[0]:g}) was used")
            _note_if_blank(y, "window", notes)
            return y, info
    return _robust_window(stored, values, rescale, notes)


def _robust_window(stored: np.ndarray, values: np.ndarray, rescale: dict[str, Any] | None,
                   notes: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The fallback when a file carries no usable VOI: the 0.5-99.5 percentile range."""
    # Percentiles of the stored integers are exact and fast (a histogram); a linear
    # rescale maps them monotonically, so they need not be taken on the float values.
    if rescale is not None and rescale["kind"] == "linear":
        a, b = pixel_math.robust_range(stored)
        low, high = sorted((a * rescale["slope"] + rescale["intercept"],
                            b * rescale["slope"] + rescale["intercept"]))
    else:
        low, high = pixel_math.robust_range(values if rescale else stored)
    kind = "percentile"
    if not high > low:  # more than 99% of the pixels share a value: use the full range
        low, high, kind = float(values.min()), float(values.max()), "minmax"
    if not high > low:
        notes.append("every pixel has the same value: the image is blank")
    elif kind == "percentile":
        notes.append(f"the file has no window (VOI LUT); the 0.5-99.5 percentile range of "
                     f"its values ({low:g} to {high:g}) was used instead")
    else:
        notes.append(f"the file has no window and its values barely vary; the full range "
                     f"({low:g} to {high:g}) was used")
    info: dict[str, Any] = {"kind": kind, "low": low, "high": high}
    if kind == "percentile":
        info.update(low_pct=pixel_math.ROBUST_LOW_PCT, high_pct=pixel_math.ROBUST_HIGH_PCT)
    return pixel_math.scale_range(values, low, high, inplace=True), info


def lut_table(item: Dataset, ds: Dataset, notes: list[str],
              what: str) -> tuple[np.ndarray, int, int] | None:
    """Read a LUT item: (table, first value mapped, bits per entry), None if unusable."""
    desc = safe_get(item, "LUTDescriptor")
    elem = item.data_element("LUTData") if "LUTData" in item else None
    try:
        entries, first, bits = (int(v) for v in desc)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        entries = first = bits = -1
    if elem is None or elem.value is None or bits == -1:
        notes.append(f"the file's {what} is malformed and was ignored")
        return None
    entries = (entries & 0xFFFF) or 65536  # 0 means 2**16; SS decoding must not go negative
    bits &= 0xFFFF
    raw = elem.value
    if isinstance(raw, (bytes, bytearray, memoryview)):
        little = ds.original_encoding[1] is not False
        if bits == 8 and len(raw) == entries:  # 8-bit entries packed two to a word
            table = np.frombuffer(bytes(raw), dtype=np.uint8)
        else:
            table = np.frombuffer(bytes(raw[: len(raw) // 2 * 2]), dtype="<u2" if little else ">u2")
    else:
        table = np.asarray(raw if isinstance(raw, (list, tuple)) or hasattr(raw, "__len__")
                           else [raw], dtype=np.int64)
    table = table[:entries]
    if table.size == 0 or not 1 <= bits <= 16 or table.min() < 0:
        notes.append(f"the file's {what} is malformed and was ignored")
        return None
    if table.size < entries:
        notes.append(f"the file's {what} holds {table.size} of its {entries} entries")
    return table.astype(np.uint16 if table.max() <= 0xFFFF else np.uint32), first, bits


def lookup(values: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    """Map values through a LUT: below ``first`` -> entry 0, beyond the end -> last entry."""
    if np.issubdtype(values.dtype, np.integer):
        idx = values.astype(np.int64) - first
    else:
        idx = np.rint(values.astype(np.float64) - first)
    np.clip(idx, 0, table.size - 1, out=idx)
    return table[idx.astype(np.intp)]


def _lut_full_scale(table: np.ndarray, bits: int, notes: list[str]) -> float:
    """The LUT output that means 'white': 2**bits - 1, unless the table plainly uses fewer
    bits (a 16-bit descriptor over 12-bit data, a common vendor slip) which would show the
    image almost black."""
    used = max(int(table.max()).bit_length(), 1)
    if bits > 8 and used + 2 < bits:
        notes.append(f"the VOI LUT declares {bits}-bit output but its entries use only "
                     f"{used} bits; scaled as {used}-bit")
        bits = used
    return float((1 << bits) - 1)


def _note_if_blank(y: np.ndarray, what: str, notes: list[str]) -> None:
    black, white = pixel_math.fraction_at_extremes(y)
    if max(black, white) >= 0.99:
        shade = "black" if black >= white else "white"
        notes.append(f"the file's {what} leaves {100 * max(black, white):.0f}% of the image "
                     f"{shade}; it may not suit this image")


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = safe_get(ds, keyword)
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def safe_get(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)``, or None when the stored value cannot be converted.

    pydicom converts values lazily and raises on malformed ones (a DS of "x.1"); an
    optional attribute that cannot be read is treated as absent.
    """
    try:
        return ds.get(keyword)
    except Exception:  # any conversion failure means "unusable", never "file unreadable"
        return None


def numbers(value: Any) -> list[float]:
    """DS values (one or many) as finite floats; [] if absent or unreadable."""
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (list, tuple)) or (
        hasattr(value, "__iter__") and not isinstance(value, (str, bytes))) else [value]
    out = []
    for v in items:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return []
        if not math.isfinite(f):
            return []
        out.append(f)
    return out


def _number(value: Any) -> float | None:
    nums = numbers(value)
    return nums[0] if nums else None
