"""DICOM files to display pixels, the way a radiologist's viewer shows them.

This module parses the file, checks it can be decoded safely and decodes one frame; the
transforms to display values are in :mod:`lungvit.core.io.dicom_display`.

The grayscale pipeline runs in the order of PS3.3 C.11 (and PS3.4 N.2):

1. decode ONE frame (the middle one unless asked; other frames are never decoded);
2. Modality LUT: Rescale Slope/Intercept, or the Modality LUT Sequence;
3. VOI: a caller's window override, else the VOI LUT Sequence, else the first Window
   Center/Width with its VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID), else a
   robust 0.5-99.5 percentile window (reported as a warning);
4. MONOCHROME1 (or a Presentation LUT Shape of INVERSE) inverted, so air is dark;
5. [0, 1] float32.

Colour images (RGB, YBR_*, PALETTE COLOR) become BT.601 luminance, with a warning.
Everything that could make decoding explode is checked on the header first.
"""
from __future__ import annotations

import io
import logging
import math
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pydicom
import pydicom.uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame, parse_basic_offsets, parse_fragments
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels import as_pixel_options, get_decoder

from lungvit.core.io.dicom_display import color_to_display, gray_to_display, numbers, safe_get
from lungvit.core.errors import (
    CorruptFileError, DecompressionBombError, NoPixelDataError, ScanReadError,
    UnsupportedImageError,
)
from lungvit.core.io.phi import extract_phi, patient_key
from lungvit.core.io.scan import Scan, ScanMetadata

_DEFLATED = pydicom.uid.DeflatedExplicitVRLittleEndian
_COLOR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})
_MONO = frozenset({"MONOCHROME1", "MONOCHROME2"})
_J2K = frozenset({pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000})
# A deflated dataset may inflate to one 16-bit image at the pixel limit plus 16 MiB of
# header: 116 MiB at the default 50 megapixels.
_INFLATE_OVERHEAD = 16 << 20
_INFLATE_STEP = 8 << 20


def read_dicom(data: bytes, *, label: str, frame: int | None,
               window: tuple[float, float] | str | None, include_phi: bool,
               max_pixels: int, min_side: int | None = None) -> Scan:
    """Decode DICOM bytes into a :class:`Scan` (see the module docstring for the order).

    Args:
        data: the whole file.
        label: how to name the file in messages (its basename, quoted).
        frame / window / include_phi / max_pixels / min_side: as in
            :func:`~lungvit.core.io.ingest.load_scan`.
    """
    notes: list[str] = []
    # pydicom converts header values lazily, so its warnings can fire at any access.
    with _quiet_pydicom(notes):
        return _read(data, label, frame, window, include_phi, max_pixels, min_side, notes)


def _read(data: bytes, label: str, frame: int | None,
          window: tuple[float, float] | str | None, include_phi: bool, max_pixels: int,
          min_side: int | None, notes: list[str]) -> Scan:
    ds, deflated = _parse(data, label, inflate_limit=2 * max_pixels + _INFLATE_OVERHEAD)
    ts = _transfer_syntax(ds, label, notes)
    meta = _header_metadata(ds, include_phi)
    meta.warnings = notes
    meta.transfer_syntax = _DEFLATED.name if deflated else ts.name
    _require_pixels(ds, label, meta.sop_class)
    rows, cols, spp, frames = _check_geometry(ds, ts, label, max_pixels, notes)
    meta.original_shape, meta.number_of_frames = (rows, cols), frames
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    meta.photometric_interpretation = photometric
    meta.bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    meta.frame_used = index = _choose_frame(frame, frames, label, notes)

    if photometric not in _MONO and photometric not in _COLOR:
        raise UnsupportedImageError(f"{label} uses the photometric interpretation "
                                    f"{photometric or '(none)'}, which LungViT cannot display")
    arr, photometric_out, level = _decode_frame(
        ds, ts, index, frames, label, min_side if photometric in _MONO else None)
    if level:
        meta.resolution_level = level
        notes.append(f"read at 1/{2 ** level} size ({arr.shape[1]}x{arr.shape[0]} of {cols}x"
                     f"{rows}, the file's JPEG 2000 resolution level {level}), as at least "
                     f"{min_side} px were asked for")
    if photometric in _MONO:
        if arr.ndim != 2:
            raise CorruptFileError(f"{label} is labelled {photometric} but holds "
                                   f"{arr.shape[-1]} samples per pixel")
        pixels = gray_to_display(arr, ds, meta, window, notes)
    else:
        pixels = color_to_display(arr, ds, photometric, photometric_out, meta, window, label,
                                  notes)
    return Scan(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)


@contextmanager
def _quiet_pydicom(notes: list[str]) -> Iterator[None]:
    """Hold back pydicom's warnings and log records while it parses or decodes.

    Their text can quote header values (pydicom's "Invalid value for VR ...: '<value>'"),
    and LungViT never logs PHI; they are counted into one neutral note instead. (In
    Python < 3.14 ``catch_warnings`` is process-wide, so a warning raised by another
    thread during a read can be swallowed too; nothing is ever printed by mistake.)
    """
    class _Drop(logging.Filter):
        count = 0

        def filter(self, record: logging.LogRecord) -> bool:
            self.count += record.levelno >= logging.WARNING
            return False

    # A logger's filters see only records created on it, not its children's, so the
    # filter goes on every pydicom logger (all exist once pydicom is imported).
    drop = _Drop()
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "pydicom" or name.startswith("pydicom.")]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
    n = max(len(caught), drop.count)
    if n:
        notes.append(f"the DICOM reader found {n} irregularit{'y' if n == 1 else 'ies'} in "
                     "the file (details withheld: they can quote patient data)")


def _parse(data: bytes, label: str, *, inflate_limit: int) -> tuple[Dataset, bool]:
    """Read the dataset; a Deflated body is inflated here, with a size bound."""
    deflated = False
    try:
        if data[128:132] == b"DICM" and _DEFLATED.encode() in data[132:8192]:
            data, deflated = _inflate(data, label, inflate_limit)
        # force=True only because the caller sniffed DICOM content (raw files lack "DICM").
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except ScanReadError:
        raise
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise CorruptFileError(f"{label} looks like DICOM but its header cannot be read "
                               "(damaged or truncated file)") from exc
    return ds, deflated


def _inflate(data: bytes, label: str, limit: int) -> tuple[bytes, bool]:
    """Re-write a Deflated Explicit VR file as plain Explicit VR, inflating at most ``limit``."""
    fp = io.BytesIO(data)
    fp.seek(132)
    meta = FileMetaDataset(read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                        stop_when=lambda tag, vr, length: tag >> 16 != 2))
    if meta.get("TransferSyntaxUID") != _DEFLATED:
        return data, False
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    body, pending = bytearray(), memoryview(data)[fp.tell():]
    try:
        # In steps, so memory stays near the limit (one growing buffer, no final copy).
        while pending and len(body) <= limit:
            body += inflater.decompress(pending, min(_INFLATE_STEP, limit + 1 - len(body)))
            pending = inflater.unconsumed_tail
            if inflater.eof:
                break
    except zlib.error as exc:
        raise CorruptFileError(f"{label} is a deflated DICOM whose compressed data is "
                               "damaged") from exc
    if len(body) > limit:
        raise DecompressionBombError(
            f"{label} is a deflated DICOM that expands beyond {limit / 2**20:.0f} MiB, more "
            "than any scan within the pixel limit needs; refused")
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength
    out = io.BytesIO()
    out.write(data[:132])
    write_file_meta_info(out, meta, enforce_standard=False)
    out.write(body)
    return out.getvalue(), True


def _transfer_syntax(ds: Dataset, label: str, notes: list[str]) -> pydicom.uid.UID:
    """The transfer syntax of the pixel data; guessed from the encoding for raw files."""
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if ts:
        return pydicom.uid.UID(str(ts))
    implicit, little = ds.original_encoding[:2]
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise UnsupportedImageError(f"{label} holds compressed pixel data but does not say "
                                    "which compression (no Transfer Syntax UID)")
    guess = (pydicom.uid.ImplicitVRLittleEndian if implicit else
             pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    if "PixelData" in ds:
        notes.append(f"the file has no DICOM file header (no Transfer Syntax UID); read as "
                     f"{guess.name}")
    file_meta = file_meta if file_meta is not None else FileMetaDataset()
    file_meta.TransferSyntaxUID = guess
    ds.file_meta = file_meta
    return guess


def _header_metadata(ds: Dataset, include_phi: bool) -> ScanMetadata:
    """Everything non-identifying the header says, plus the patient key (and PHI if asked)."""
    file_meta = getattr(ds, "file_meta", None)
    sop = safe_get(ds, "SOPClassUID") or (file_meta and safe_get(file_meta,
                                                                 "MediaStorageSOPClassUID"))
    spacing = numbers(safe_get(ds, "PixelSpacing")) or numbers(safe_get(ds, "ImagerPixelSpacing"))
    if len(spacing) < 2 or min(spacing) <= 0:
        spacing = []
    return ScanMetadata(
        source_format="dicom",
        modality=_text(safe_get(ds, "Modality")),
        view_position=_text(safe_get(ds, "ViewPosition")),
        body_part=_text(safe_get(ds, "BodyPartExamined")),
        sop_class=pydicom.uid.UID(str(sop)).name if sop else None,
        pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
        patient_key=patient_key(_text(safe_get(ds, "PatientID"))),
        phi=extract_phi(ds) if include_phi else None,
    )


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _require_pixels(ds: Dataset, label: str, sop_name: str | None) -> None:
    """Refuse objects without an image, naming what they are."""
    if "PixelData" in ds:
        return
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedImageError(f"{label} holds floating-point pixel data (a parametric "
                                    "map), which LungViT does not read")
    if sop_name and "Image Storage" in sop_name:
        raise CorruptFileError(f"{label} is a {sop_name} object but holds no pixel data: "
                               "the file is truncated, or was saved without its image")
    if not sop_name:
        raise CorruptFileError(f"{label} looks like DICOM but neither an image nor an "
                               "object type could be read from it (damaged file?)")
    raise NoPixelDataError(f"{label} is a DICOM '{sop_name}' object, which holds no image; "
                           "LungViT needs an X-ray or OCT image")


def _check_geometry(ds: Dataset, ts: pydicom.uid.UID, label: str, max_pixels: int,
                    notes: list[str]) -> tuple[int, int, int, int]:
    """Refuse impossible or oversized headers before a byte is decoded."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits_alloc = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored") or bits_alloc)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{label} has pixel data but its image description (rows, "
                               "columns, bits) is missing or unreadable") from exc
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = ds.NumberOfFrames = 1  # our in-memory copy, so the decoder agrees
        notes.append("the Number of Frames in the header is unreadable; 1 frame was assumed")
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise CorruptFileError(f"{label} declares an empty image ({cols}x{rows}, {frames} frames)")
    if spp not in (1, 3) or bits_alloc not in (1, 8, 16, 32) or not 1 <= bits_stored <= bits_alloc:
        raise UnsupportedImageError(
            f"{label} uses {spp} samples per pixel, {bits_alloc} bits allocated and "
            f"{bits_stored} bits stored, which LungViT does not read")
    frame_pixels = rows * cols
    if frame_pixels > max_pixels:
        raise DecompressionBombError(
            f"{label} declares a {cols}x{rows} image ({frame_pixels / 1e6:.0f} megapixels); "
            f"LungViT refuses images above {max_pixels / 1e6:.0f} megapixels")
    promised = frame_pixels * spp * frames
    pixel_data = ds.PixelData
    if ts.is_encapsulated:
        buf = io.BytesIO(pixel_data)
        try:
            parse_basic_offsets(buf)
            held = parse_fragments(buf)[0]
        except (ValueError, EOFError) as exc:
            raise CorruptFileError(f"{label} holds compressed pixel data whose framing is "
                                   "damaged") from exc
        short = held < frames
        have = f"{held} compressed fragment(s)"
    else:
        per_frame = frame_pixels * spp * bits_alloc / 8
        if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
            per_frame = per_frame * 2 / 3
        held_bytes = len(pixel_data)
        short = held_bytes < math.ceil(per_frame * frames)
        have = f"{held_bytes} bytes, enough for {int(held_bytes // max(per_frame, 1))} frame(s)"
    if short:
        if promised > max_pixels:
            raise DecompressionBombError(
                f"{label} declares {frames} frame(s) of {cols}x{rows} but holds only {have}; "
                "a header that promises far more than the file holds is refused")
        raise CorruptFileError(f"{label} declares {frames} frame(s) of {cols}x{rows} but holds "
                               f"only {have}: the file is truncated or damaged")
    return rows, cols, spp, frames


def _choose_frame(frame: int | None, frames: int, label: str, notes: list[str]) -> int:
    if frame is not None:
        if not 0 <= frame < frames:
            raise ScanReadError(f"frame {frame} was asked for, but {label} has "
                                f"{frames} frame(s) (numbered 0 to {frames - 1})")
        if frames > 1:
            notes.append(f"the file holds {frames} frames; frame {frame} was used, as asked")
        return frame
    if frames == 1:
        return 0
    index = frames // 2
    notes.append(f"the file holds {frames} frames; only the middle one (frame {index}, "
                 "counting from 0) was read; choose another with frame=")
    return index


def _decode_frame(ds: Dataset, ts: pydicom.uid.UID, index: int, frames: int,
                  label: str, min_side: int | None = None) -> tuple[np.ndarray, str, int]:
    """Decode one frame; returns it, the photometric interpretation it came out in and the
    JPEG 2000 resolution level decoded (0: full size; see :func:`_decode_reduced`)."""
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise UnsupportedImageError(f"{label} uses the transfer syntax {ts.name} ({ts}), "
                                    "which LungViT cannot decode") from exc
    if not decoder.is_available:
        raise UnsupportedImageError(f"{label} is compressed with {ts.name}, and no decoder "
                                    "for it is installed")
    if ts.is_encapsulated:
        try:
            frame_bytes = get_frame(ds.PixelData, index, number_of_frames=frames)
        except (ValueError, EOFError, KeyError, IndexError) as exc:
            raise CorruptFileError(f"{label}: frame {index} cannot be found in the "
                                   "compressed pixel data (damaged file?)") from exc
        claimed = _codestream_size(frame_bytes)
        if claimed and claimed[0] * claimed[1] > max(int(ds.Rows) * int(ds.Columns), 1):
            raise DecompressionBombError(
                f"{label}: the compressed frame claims {claimed[0]}x{claimed[1]} pixels, more "
                f"than the {ds.Columns}x{ds.Rows} the header declares; refused")
        if min_side and ts in _J2K:
            reduced = _decode_reduced(ds, frame_bytes, min_side)
            if reduced is not None:
                return reduced[0], str(ds.PhotometricInterpretation), reduced[1]
    # Native pixels are read in place (the pipeline never writes to them) when no unused
    # high bits need masking; otherwise pydicom must copy, and would log that it did.
    opts = as_pixel_options(ds)
    opts["view_only"] = opts.get("bits_stored") == opts.get("bits_allocated")
    try:
        arr, props = decoder.as_array(ds, index=index, **opts)
    except BaseException as exc:  # codecs raise RuntimeError, ValueError, ... on bad data
        if not is_codec_failure(exc):
            raise
        # A codec that fails cannot tell damage from an unsupported variant (12-bit JPEG
        # Extended, say); the message names both, the type follows the transfer syntax.
        error = UnsupportedImageError if ts.is_compressed else CorruptFileError
        raise error(f"{label}: its {ts.name} pixel data could not be decoded; the file is "
                    "damaged or uses a variant the installed decoders do not support") from exc
    return arr, str(props.get("photometric_interpretation", ds.PhotometricInterpretation)), 0


def reduction_level(rows: int, cols: int, min_side: int, levels: int) -> int:
    """The coarsest JPEG 2000 resolution level (at most ``levels``) whose longest side,
    ``ceil(side / 2**level)``, is still at least ``min_side``; 0 when none is."""
    side, level = max(rows, cols), 0
    while level < levels and -(-side // 2 ** (level + 1)) >= min_side:
        level += 1
    return level


def _decode_reduced(ds: Dataset, codestream: bytes, min_side: int
                    ) -> tuple[np.ndarray, int] | None:
    """A grayscale JPEG 2000 frame decoded at a reduced resolution level, or None when the
    full decode is needed (the image is too small to reduce, or the codestream is not the
    plain unsigned single-component kind this path checks it is).

    JPEG 2000 stores an image as wavelet resolution levels; level ``r`` is the image
    low-pass filtered and halved ``r`` times, and decoding it skips the finer levels'
    work (a 2,000 px frame at level 1: 0.42x the full decode's time, bench_app.py).
    pydicom's JPEG 2000 plugin decodes only the full image, so this uses Pillow's
    openjpeg, which scales samples of ``p`` bits to its 8 or 16-bit modes by a left shift;
    the shift is undone here. Any surprise (another mode, shape or error) falls back to
    the full decode by pydicom, which then reports damage in its own words.
    """
    siz = _siz(codestream)
    if siz is None or int(ds.get("PixelRepresentation", 0)) != 0:
        return None
    rows, cols, components, precision, signed, levels = siz
    stored = int(ds.get("BitsStored") or 0)
    if (components != 1 or signed or precision != stored or not 1 <= precision <= 16
            or (rows, cols) != (int(ds.Rows), int(ds.Columns))):
        return None
    level = reduction_level(rows, cols, min_side, levels)
    if level == 0:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as im:
            im.reduce = level
            im.load()
            mode, arr = im.mode, np.asarray(im)
    except Exception:  # noqa: BLE001 - damaged or unusual: pydicom's full decode decides
        return None
    shift = {"L": 8, "I;16": 16}.get(mode, 0) - precision
    want = (-(-rows // 2 ** level), -(-cols // 2 ** level))
    if shift < 0 or arr.shape != want:
        return None
    return (arr >> shift if shift else arr).astype(np.uint16 if precision > 8 else np.uint8), level


def _siz(codestream: bytes) -> tuple[int, int, int, int, bool, int] | None:
    """(rows, columns, components, precision, signed, decomposition levels) of a raw
    JPEG 2000 codestream's SIZ and COD markers (ISO/IEC 15444-1 A.5.1, A.6.1); None when
    the frame does not start with them as DICOM asks (PS3.5 A.4.4)."""
    head = bytes(codestream[:4096])
    if not head.startswith(b"\xff\x4f\xff\x51") or len(head) < 43:
        return None
    cols, rows = _j2k_extent(head, 0)
    components, ssiz = int.from_bytes(head[40:42], "big"), head[42]
    pos = 2  # the main header's marker segments, from SIZ up to the first tile (SOT)
    while pos + 10 <= len(head) and head[pos] == 0xFF and head[pos + 1] != 0x90:
        if head[pos + 1] == 0x52:  # COD: length, Scod, SGcod (4 bytes), the level count
            return rows, cols, components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), head[pos + 9]
        pos += 2 + int.from_bytes(head[pos + 2:pos + 4], "big")
    return None


def is_codec_failure(exc: BaseException) -> bool:
    """True for errors a decoder raises on bad data: any Exception, and the PanicException
    (a BaseException) that Rust codecs built with pyo3, such as pylibjpeg-rle, raise when
    damaged data makes them index out of bounds."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _j2k_extent(head: bytes, at: int) -> tuple[int, int]:
    """(width, height) of the image a JPEG 2000 SIZ marker (after the SOC at ``at``) declares."""
    x, y, x0, y0 = (int.from_bytes(head[at + o:at + o + 4], "big") for o in (8, 12, 16, 20))
    return max(x - x0, 0), max(y - y0, 0)


def _codestream_size(src: bytes) -> tuple[int, int] | None:
    """(width, height) declared by a JPEG/JPEG-LS SOF or JPEG 2000 SIZ marker, if found."""
    head = bytes(src[:65536])
    at = head.find(b"\xff\x4f\xff\x51")  # J2K: SOC then SIZ (possibly inside a JP2 box)
    if at >= 0 and len(head) >= at + 24:
        return _j2k_extent(head, at)
    if not head.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 9 <= len(head) and head[pos] == 0xFF:
        marker = head[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xF7:
            return (int.from_bytes(head[pos + 7:pos + 9], "big"),
                    int.from_bytes(head[pos + 5:pos + 7], "big"))
        pos += 2 + int.from_bytes(head[pos + 2:pos + 4], "big")
    return None
