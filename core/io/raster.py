"""PNG and JPEG files to display pixels, at full precision.

PNG/JPEG scans are already in display convention (exported by a viewer), so no window
is applied unless the caller asks; pixels are divided by the full scale of their bit
depth. Sixteen-bit grayscale is read as uint16 (Pillow's "I;16" -> "L" conversion
clips), and a 16-bit file whose values never exceed 12 (or 10, 14, 8) bits is scaled as
such, with a note, so 12-bit data stored in 16-bit PNGs does not look black. Colour,
palette and transparent images become BT.601 luminance (alpha composited on black),
EXIF orientation is honoured.
"""
from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lungvit.core.io import pixel_math
from lungvit.core.errors import (
    CorruptFileError, DecompressionBombError, ScanReadError, UnsupportedImageError,
)
from lungvit.core.io.scan import Scan, ScanMetadata

_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
# Bit depths a 16-bit container is assumed to hold, by its largest value (see module doc).
_IMPLIED_BITS = (8, 10, 12, 14, 16)
_EXIF_ORIENTATION = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, IndexError,
                  KeyError, TypeError)


def read_raster(data: bytes, *, kind: str, label: str,
                window: tuple[float, float] | str | None, max_pixels: int) -> Scan:
    """Decode PNG or JPEG bytes into a :class:`Scan`.

    Args:
        data: the whole file.
        kind: "png" or "jpeg" (from content sniffing).
        label: how to name the file in messages.
        window: optional (center, width) in the file's own pixel values, or "auto" /
            "minmax" (see :func:`lungvit.core.io.pixel_math.resolve_window`).
        max_pixels: refuse images with more pixels than this, before decoding them.
    """
    notes: list[str] = []
    im = _open(data, kind, label, max_pixels)
    mode = im.mode
    meta = ScanMetadata(source_format=kind, photometric_interpretation=mode)
    if getattr(im, "n_frames", 1) > 1:
        notes.append(f"the file holds {im.n_frames} frames (animation); the first was used")
    try:
        im.load()
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation not in (None, 1):
            im = ImageOps.exif_transpose(im)
            notes.append(f"rotated/flipped upright as its EXIF orientation ({orientation}) says")
        gray, full, bits = _to_gray(im, meta, notes, label)
    except ScanReadError:
        raise
    except _DECODE_ERRORS as exc:
        raise CorruptFileError(f"{label} could not be decoded as {_FORMATS[kind]}: the file "
                               "is truncated or damaged") from exc
    meta.bits_stored = bits
    meta.original_shape = (int(gray.shape[0]), int(gray.shape[1]))
    window, named = pixel_math.resolve_window(window, gray, notes)
    if window is not None:
        meta.window = pixel_math.window_info(window, named)
        pixels = pixel_math.apply_window(gray, window[0], window[1], inplace=True)
    else:
        meta.window = {"kind": "full_range", "low": 0.0, "high": full}
        pixels = pixel_math.scale_range(gray, 0.0, full, inplace=True)
    meta.warnings = notes
    return Scan(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)


def _open(data: bytes, kind: str, label: str, max_pixels: int) -> Image.Image:
    """Open lazily and check the declared size before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns between its global limit and twice it; our
            # limit (below) is the one that decides, so its warning is not needed.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[_FORMATS[kind]])
    except Image.DecompressionBombError as exc:
        raise DecompressionBombError(f"{label} declares an image too large to decode safely; "
                                     "refused") from exc
    except (UnidentifiedImageError, *_DECODE_ERRORS) as exc:
        raise CorruptFileError(f"{label} starts like a {_FORMATS[kind]} file but cannot be "
                               "opened: it is truncated or damaged") from exc
    width, height = im.size
    if width <= 0 or height <= 0:
        raise CorruptFileError(f"{label} declares an empty {width}x{height} image")
    if width * height > max_pixels:
        raise DecompressionBombError(
            f"{label} declares a {width}x{height} image ({width * height / 1e6:.0f} "
            f"megapixels); LungViT refuses images above {max_pixels / 1e6:.0f} megapixels")
    return im


def _to_gray(im: Image.Image, meta: ScanMetadata, notes: list[str],
             label: str) -> tuple[np.ndarray, float, int]:
    """(H, W) float32 gray in the file's units, its full scale, and its bits per sample."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32), 1.0, 1
    if mode == "L":
        return np.asarray(im, dtype=np.float32), 255.0, 8
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
            raise UnsupportedImageError(f"{label} holds 32-bit pixel values, which LungViT "
                                        "does not read")
        top = int(arr.max()) if arr.size else 0
        bits = next(b for b in _IMPLIED_BITS if top < (1 << b))
        if bits < 16:
            notes.append(f"16-bit image whose values never exceed {top}; scaled as {bits}-bit "
                         f"data (0 to {(1 << bits) - 1}) so it is not shown nearly black")
        return arr.astype(np.float32), float((1 << bits) - 1), 16
    if mode == "LA":
        arr = np.asarray(im, dtype=np.float32)
        notes.append("the image has transparency; it was composited on black")
        return arr[..., 0] * (arr[..., 1] / 255.0), 255.0, 8
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        notes.append("a palette (indexed-colour) image was expanded to colour")
    elif mode not in ("RGB", "RGBA"):
        try:
            im = im.convert("RGB")
        except ValueError as exc:
            raise UnsupportedImageError(f"{label} uses the image mode {mode}, which LungViT "
                                        "cannot read") from exc
        notes.append(f"the image was stored as {mode}; it was converted to RGB first")
    arr = np.asarray(im)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * alpha
        notes.append("the image has transparency; it was composited on black")
    else:
        rgb = arr
    gray, meta.color_saturation = pixel_math.luminance(rgb, 255.0)
    if note := pixel_math.colour_note(mode, meta.color_saturation):
        notes.append(note)
    return gray, 255.0, 8
