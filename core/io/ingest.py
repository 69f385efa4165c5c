"""The one way a scan file becomes pixels: :func:`load_scan`.

Files are recognised by content, never by extension: DICOM (the "DICM" marker at byte
128, or a raw dataset without the 128-byte preamble), PNG and JPEG signatures. A file
whose extension names another scan format is read by content with a warning; anything
else is refused with an error that says what the file looks like (a PDF, a ZIP, text).

Every failure is a :class:`~lungvit.core.errors.ScanReadError` subclass with a message a
clinician can act on: :class:`EmptyFileError`, :class:`CorruptFileError`,
:class:`UnsupportedImageError`, :class:`NoPixelDataError`, :class:`DecompressionBombError`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

from lungvit.core.io.dicom import is_codec_failure, read_dicom
from lungvit.core.errors import (
    CorruptFileError, DecompressionBombError, EmptyFileError, ScanReadError,
    UnsupportedImageError,
)
from lungvit.core.io.pixel_math import WINDOW_RANGES
from lungvit.core.io.raster import read_raster
from lungvit.core.io.scan import Scan

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
# The longest side LungViT decodes for showing, predicting and training when a file can be
# decoded smaller (JPEG 2000's resolution levels): three quarters of the app's 1,024 px
# display at least, and over three times the largest model input (224 px) that is resized
# from it (BENCHMARKS.md says how much that moved probabilities), while a 2,000 px frame
# is read at 1,000 px in 0.42x the full decode's time (bench/bench_app.py --user-path).
WORKING_SIDE = 768
# No scan LungViT reads comes near this; a bigger file is refused before it is read.
MAX_FILE_BYTES = 1 << 30

_EXTENSIONS = {
    "dicom": {".dcm", ".dicom", ".dic", ".ima"},
    "png": {".png"},
    "jpeg": {".jpg", ".jpeg", ".jpe", ".jfif"},
}
_FORMAT_NAMES = {"dicom": "DICOM", "png": "PNG", "jpeg": "JPEG"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split())

# (test on the first bytes, what the file is, True when it is an image format we could
# suggest converting). Checked in order, after the scan formats.
_OTHER_FORMATS: tuple[tuple[bytes, int, str, bool], ...] = (
    (b"%PDF", 0, "a PDF document", False),
    (b"PK\x03\x04", 0, "a ZIP archive (or a Word/Excel/PowerPoint file)", False),
    (b"\x1f\x8b", 0, "a gzip-compressed file (unpack it first)", False),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive", False),
    (b"Rar!", 0, "a RAR archive", False),
    (b"GIF8", 0, "a GIF image", True),
    (b"II*\x00", 0, "a TIFF image", True),
    (b"MM\x00*", 0, "a TIFF image", True),
    (b"BM", 0, "a BMP image", True),
    (b"WEBP", 8, "a WebP image", True),
    (b"\x00\x00\x00\x0cjP  ", 0, "a JPEG 2000 image (not wrapped in DICOM)", True),
    (b"\xff\x4f\xff\x51", 0, "a raw JPEG 2000 codestream", True),
    (b"ftyp", 4, "an HEIC/MP4 (ISO media) file", False),
    (b"n+1\x00", 344, "a NIfTI volume", False),
    (b"\x93NUMPY", 0, "a NumPy array file", False),
)


def load_scan(
    source: str | Path | bytes | bytearray | memoryview | BinaryIO,
    *,
    name: str | None = None,
    frame: int | None = None,
    window: tuple[float, float] | str | None = None,
    include_phi: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> Scan:
    """Read a DICOM, PNG or JPEG scan into display-ready pixels plus metadata.

    Args:
        source: a path, the file's bytes, or a binary file object.
        name: the file name to report (only its last path component is kept); defaults to
            the path's or file object's name.
        frame: which frame of a multi-frame DICOM to read (from 0); default the middle one.
            Only that frame is decoded.
        window: (center, width) to use instead of the file's own window, in the file's
            values after the Modality LUT (Hounsfield units for CT, stored values for PNG);
            or "auto" (the 0.5-99.5 percentiles of those values) or "minmax" (all of them),
            computed from the one decode (a blank image keeps the file's own window).
        include_phi: copy identifying DICOM attributes into ``meta.phi`` (off by default).
        max_pixels: the largest rows x columns accepted; larger images are refused before
            decoding.
        min_side: the longest side the caller needs (None: the full image). A grayscale
            JPEG 2000 DICOM is then decoded at its coarsest resolution level that is still
            at least this large (``meta.resolution_level`` says which, and a note says so);
            other files are decoded in full. LungViT's readers for showing, predicting
            and training pass :data:`WORKING_SIDE`.

    Returns:
        A :class:`~lungvit.core.io.scan.Scan`: (H, W) float32 pixels in [0, 1], air dark.

    Raises:
        ScanReadError: a subclass saying what is wrong with the file.
        ValueError: invalid ``window``, ``frame`` or ``max_pixels`` arguments.
    """
    if isinstance(window, str):
        if window not in WINDOW_RANGES:
            raise ValueError(f"window must be (center, width) or one of {WINDOW_RANGES}, "
                             f"got {window!r}")
    elif window is not None and not (len(window) == 2 and float(window[1]) >= 1.0):
        raise ValueError(f"window must be (center, width) with width >= 1, got {window!r}")
    if frame is not None and frame < 0:
        raise ValueError(f"frame must be 0 or more, got {frame}")
    if max_pixels <= 0:
        raise ValueError("max_pixels must be positive")
    if min_side is not None and min_side <= 0:
        raise ValueError(f"min_side must be positive or None, got {min_side}")
    data, name = _read_source(source, name)
    label = f"'{name}'" if name else "the file"
    if not data:
        raise EmptyFileError(f"{label} is empty (0 bytes): the upload or copy did not complete")
    kind = sniff(data, label, name)
    notes: list[str] = []
    claimed = _claimed_format(name)
    if claimed is not None and claimed != kind:
        notes.append(f"the name ends in {Path(name or '').suffix} but the file is "
                     f"{_FORMAT_NAMES[kind]}; it was read as {_FORMAT_NAMES[kind]}")
    try:
        if kind == "dicom":
            scan = read_dicom(data, label=label, frame=frame, window=window,
                              include_phi=include_phi, max_pixels=max_pixels,
                              min_side=min_side)
        else:
            scan = read_raster(data, kind=kind, label=label, window=window,
                               max_pixels=max_pixels)
    except ScanReadError:
        raise
    except MemoryError as exc:
        raise DecompressionBombError(f"{label} needs more memory to decode than is "
                                     "available") from exc
    except BaseException as exc:  # last line of defence: damaged files reach odd code paths
        if not is_codec_failure(exc):  # KeyboardInterrupt, SystemExit: not ours to catch
            raise
        logger.debug("decoding failed with %s", type(exc).__name__)  # never the message: PHI
        raise CorruptFileError(f"{label} could not be decoded as {_FORMAT_NAMES[kind]}; it "
                               f"looks damaged ({type(exc).__name__})") from exc
    scan.meta.name = name
    scan.meta.warnings[:0] = notes
    return scan


def _read_source(source: str | Path | bytes | bytearray | memoryview | BinaryIO,
                 name: str | None) -> tuple[bytes, str | None]:
    """The file's bytes and its base name (never a full path)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or path.name
        label = f"'{path.name}'"
        try:
            size = path.stat().st_size
            if path.is_dir():
                raise ScanReadError(f"{label} is a folder, not a scan file")
            if size > MAX_FILE_BYTES:
                raise UnsupportedImageError(f"{label} is {size / 2**30:.1f} GiB; LungViT reads "
                                            f"files up to {MAX_FILE_BYTES / 2**30:.0f} GiB")
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ScanReadError(f"{label}: no such file") from exc
        except PermissionError as exc:
            raise ScanReadError(f"{label} cannot be opened: permission denied") from exc
        except IsADirectoryError as exc:
            raise ScanReadError(f"{label} is a folder, not a scan file") from exc
    elif hasattr(source, "read"):
        name = name or (getattr(source, "name", None) if isinstance(
            getattr(source, "name", None), str) else None)
        data = source.read(MAX_FILE_BYTES + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("load_scan needs a binary file object (opened with 'rb')")
        if len(data) > MAX_FILE_BYTES:
            raise UnsupportedImageError(f"the file is larger than {MAX_FILE_BYTES / 2**30:.0f} "
                                        "GiB, which LungViT does not read")
        data = bytes(data)
    else:
        raise TypeError(f"load_scan reads a path, bytes or a binary file, not "
                        f"{type(source).__name__}")
    return data, (os.path.basename(str(name).replace("\\", "/")) or None) if name else None


def sniff(data: bytes, label: str = "the file", name: str | None = None) -> str:
    """Recognise a scan by content: "dicom", "png" or "jpeg".

    Raises:
        UnsupportedImageError: another known format (PDF, ZIP, GIF, ...), when the name does
            not claim to be a scan.
        CorruptFileError: anything else, or another format under a scan's extension.
    """
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if _looks_like_raw_dicom(data):
        return "dicom"
    what, convertible = _describe(data)
    claimed = _claimed_format(name)
    advice = "convert it to PNG" if convertible else "LungViT reads DICOM, PNG and JPEG scans"
    if claimed is not None:
        raise CorruptFileError(f"{label} is not a {_FORMAT_NAMES[claimed]} file despite its "
                               f"name: it looks like {what}; {advice}")
    if what.startswith("an unrecognised"):
        raise CorruptFileError(f"{label} is not a scan LungViT recognises: it looks like "
                               f"{what}; LungViT reads DICOM, PNG and JPEG scans")
    raise UnsupportedImageError(f"{label} looks like {what}, not a scan; {advice}")


def _claimed_format(name: str | None) -> str | None:
    """The scan format a file name's extension claims ("dicom", "png", "jpeg"), if any."""
    ext = Path(name).suffix.lower() if name else ""
    return next((kind for kind, exts in _EXTENSIONS.items() if ext in exts), None)


def _looks_like_raw_dicom(data: bytes) -> bool:
    """A DICOM dataset without the 128-byte preamble: it starts with a group 0002/0008
    element, in explicit VR (little or big endian) or implicit VR little endian."""
    if len(data) < 12:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(data[0:2], order)
        if group not in (0x0002, 0x0008):
            continue
        if data[4:6] in _EXPLICIT_VRS:
            return True
        if order == "little" and int.from_bytes(data[4:8], "little") < min(len(data), 1 << 16):
            return True
    return False


def _describe(data: bytes) -> tuple[str, bool]:
    """What a non-scan file looks like, for the error message."""
    for magic, offset, what, convertible in _OTHER_FORMATS:
        if data[offset:offset + len(magic)] == magic:
            return what, convertible
    head = data[:2048]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = head[:exc.start].decode("utf-8") if exc.start > len(head) - 4 else ""
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    if text and printable >= 0.95 * len(text):
        low = text.lstrip().lower()
        if low.startswith(("<!doctype html", "<html")):
            return "a web page (HTML)", False
        if low.startswith(("{", "[")):
            return "a JSON text file", False
        if low.startswith("<?xml") or low.startswith("<svg"):
            return "an XML/SVG text file", False
        return "a text file", False
    return "an unrecognised binary file", False
