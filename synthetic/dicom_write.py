"""Write DICOM Part-10 files from arrays: fixtures for tests and the demo data set.

Everything LungViT reads in the wild has a writer here, so tests can build any variant
in ``tmp_path``: 8/12/16-bit, signed, MONOCHROME1/2, RGB/YBR/PALETTE COLOR, rescale
slope/intercept, Modality and VOI LUT sequences, window presets, multi-frame, and the
lossless compressed transfer syntaxes (RLE, JPEG-LS, JPEG 2000, JPEG Lossless SV1,
deflate). Identifying attributes are filled with :data:`PHI_SENTINELS`: fake, greppable
values that a test can search for to prove no PHI leaks into logs, metadata or outputs.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence

from lungvit.synthetic.jpeg_lossless import encode_jpeg_lossless_sv1

# Obviously fake identifying values. Text values all contain "SENTINEL" so that one
# grep finds any leak; dates/times are impossible-looking but valid DA/TM values.
PHI_SENTINELS: dict[str, str] = {
    "PatientName": "SENTINEL^PHI^NAME",
    "PatientID": "SENTINEL-PID-0001",
    "PatientBirthDate": "19010101",
    "PatientAddress": "SENTINEL-ADDRESS 1 FAKE STREET",
    "PatientTelephoneNumbers": "SENTINEL-PHONE-1",
    "OtherPatientIDs": "SENTINEL-OTHER-PID",
    "InstitutionName": "SENTINEL-INSTITUTION",
    "InstitutionAddress": "SENTINEL-INSTITUTION-ADDRESS",
    "ReferringPhysicianName": "SENTINEL^REFERRING^DOCTOR",
    "PerformingPhysicianName": "SENTINEL^PERFORMING^DOCTOR",
    "OperatorsName": "SENTINEL^OPERATOR",
    "AccessionNumber": "SENTINEL-ACC-01",
    "StudyID": "SENTINEL-ST",
    "StationName": "SENTINEL-STATION",
    "DeviceSerialNumber": "SENTINEL-SERIAL",
    "StudyDate": "19020202",
    "StudyTime": "010203",
}

# The prefix of every sentinel text value (grep for this).
PHI_MARKER = "SENTINEL"

TRANSFER_SYNTAXES: dict[str, pydicom.uid.UID] = {
    "ExplicitVRLittleEndian": pydicom.uid.ExplicitVRLittleEndian,
    "ImplicitVRLittleEndian": pydicom.uid.ImplicitVRLittleEndian,
    "DeflatedExplicitVRLittleEndian": pydicom.uid.DeflatedExplicitVRLittleEndian,
    "RLELossless": pydicom.uid.RLELossless,
    "JPEG2000Lossless": pydicom.uid.JPEG2000Lossless,
    "JPEGLSLossless": pydicom.uid.JPEGLSLossless,
    "JPEGLosslessSV1": pydicom.uid.JPEGLosslessSV1,
}

_MULTI_FRAME_IODS = frozenset({
    pydicom.uid.OphthalmicTomographyImageStorage,
    pydicom.uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    pydicom.uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    pydicom.uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
})


def _uid(name_or_uid: str) -> pydicom.uid.UID:
    """A UID from a pydicom keyword ("RLELossless") or a dotted UID string."""
    if name_or_uid in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[name_or_uid]
    if hasattr(pydicom.uid, name_or_uid):
        return getattr(pydicom.uid, name_or_uid)
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)+", name_or_uid) or len(name_or_uid) > 64:
        raise ValueError(f"unknown UID or UID keyword: {name_or_uid!r}")
    return pydicom.uid.UID(name_or_uid)


def _lut_item(lut: np.ndarray, first_mapped: int, explanation: str) -> Dataset:
    """One item of a Modality/VOI LUT Sequence, 16-bit entries stored as OW."""
    data = np.asarray(lut)
    if data.ndim != 1 or not 1 <= data.size <= 65536:
        raise ValueError("a LUT must be 1-D with 1..65536 entries")
    if data.min() < 0 or data.max() > 65535:
        raise ValueError("LUT entries must lie in 0..65535")
    item = Dataset()
    entries = 0 if data.size == 65536 else data.size  # 0 encodes 2**16 entries
    if first_mapped < 0:  # SS descriptor; readers take its first value as unsigned
        descriptor = DataElement(0x00283002, "SS", [entries - 65536 if entries > 32767
                                                    else entries, int(first_mapped), 16])
    else:
        descriptor = DataElement(0x00283002, "US", [entries, int(first_mapped), 16])
    item.add(descriptor)  # LUTDescriptor
    item.LUTExplanation = explanation
    item.add(DataElement(0x00283006, "OW", data.astype("<u2").tobytes()))  # LUTData
    return item


def _ds_value(value: float | Sequence[float]) -> Any:
    """A DS value (or list of values) with at most 16 characters each."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_ds_value(v) for v in value]
    return pydicom.valuerep.DSfloat(float(value), auto_format=True)


def _pixel_module(ds: Dataset, stored: np.ndarray, photometric: str, bits_stored: int,
                  bits_allocated: int | None, signed: bool,
                  palette: np.ndarray | None) -> None:
    """Fill the Image Pixel module (uncompressed) from ``stored``."""
    arr = np.asarray(stored)
    color = photometric in ("RGB", "YBR_FULL")
    if color:
        if arr.ndim not in (3, 4) or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"{photometric} needs (H, W, 3) or (F, H, W, 3) uint8 data")
        frames = arr.shape[0] if arr.ndim == 4 else 1
        rows, cols = arr.shape[-3:-1]
        bits_allocated = bits_stored = 8
    else:
        if arr.ndim not in (2, 3):
            raise ValueError("grayscale data must be (H, W) or (F, H, W)")
        frames = arr.shape[0] if arr.ndim == 3 else 1
        rows, cols = arr.shape[-2:]
        if bits_allocated is None:
            bits_allocated = 8 if bits_stored <= 8 else 16
        if bits_allocated not in (8, 16, 32) or not 1 <= bits_stored <= bits_allocated:
            raise ValueError(f"bits_stored={bits_stored} does not fit "
                             f"bits_allocated={bits_allocated}")
        lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed \
            else (0, (1 << bits_stored) - 1)
        if arr.size and (arr.min() < lo or arr.max() > hi):
            raise ValueError(f"values {arr.min()}..{arr.max()} do not fit {bits_stored} "
                             f"{'signed' if signed else 'unsigned'} bits")
        arr = arr.astype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = photometric
    if color:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1 or arr.ndim == (4 if color else 3):
        ds.NumberOfFrames = frames
    if photometric == "PALETTE COLOR":
        if palette is None:
            raise ValueError("PALETTE COLOR needs a palette of shape (N, 3)")
        pal = np.asarray(palette)
        if pal.ndim != 2 or pal.shape[1] != 3:
            raise ValueError("the palette must be (N, 3)")
        n = pal.shape[0]
        for i, color_name in enumerate(("Red", "Green", "Blue")):
            ds.add(DataElement(0x00281101 + i, "US", [0 if n == 65536 else n, 0, 16]))
            setattr(ds, f"{color_name}PaletteColorLookupTableData",
                    pal[:, i].astype("<u2").tobytes())
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"


def _compress(ds: Dataset, arr: np.ndarray, tsyntax: pydicom.uid.UID) -> None:
    """Replace the native pixel data with its lossless compressed encapsulation."""
    if tsyntax == pydicom.uid.JPEGLosslessSV1:
        if ds.SamplesPerPixel != 1:
            raise ValueError("the JPEG Lossless SV1 writer handles grayscale only")
        frames = arr.reshape(-1, ds.Rows, ds.Columns)
        mask = (1 << ds.BitsStored) - 1
        encoded = [encode_jpeg_lossless_sv1(
            (f.astype(np.int64) & mask).astype(np.uint16), ds.BitsStored) for f in frames]
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = tsyntax
        return
    if tsyntax == pydicom.uid.JPEG2000Lossless and min(ds.Rows, ds.Columns) < 32:
        # openjpeg's default 6 resolution levels need at least 32 pixels per side.
        raise ValueError("the JPEG 2000 writer needs images of at least 32x32 pixels")
    kwargs: dict[str, Any] = {}
    if tsyntax == pydicom.uid.RLELossless:
        kwargs["encoding_plugin"] = "pydicom"
    ds.compress(tsyntax, generate_instance_uid=False, **kwargs)


def write_dicom(
    path: str | Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    bits_allocated: int | None = None,
    signed: bool = False,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    rescale_type: str | None = None,
    modality_lut: np.ndarray | None = None,
    window_center: float | list[float] | None = None,
    window_width: float | list[float] | None = None,
    voi_lut_function: str | None = None,
    voi_lut: np.ndarray | None = None,
    voi_lut_first_mapped: int = 0,
    palette: np.ndarray | None = None,
    transfer_syntax: str = "ExplicitVRLittleEndian",
    modality: str = "DX",
    sop_class: str = "DigitalXRayImageStorageForPresentation",
    pixel_spacing: tuple[float, float] | None = (0.2, 0.2),
    view_position: str | None = "PA",
    body_part: str | None = "CHEST",
    phi: dict[str, str] | None = None,
    uid_seed: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``stored`` as a DICOM Part-10 file and return its path.

    Args:
        path: where to write (parent folders are created).
        stored: the stored pixel values: (H, W) or (F, H, W) integers for grayscale and
            PALETTE COLOR, (H, W, 3) or (F, H, W, 3) uint8 for RGB / YBR_FULL.
        photometric: "MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL" or "PALETTE COLOR".
            The values are written as given (a MONOCHROME1 caller inverts them itself).
        bits_stored: significant bits (1..16); ``bits_allocated`` defaults to 8 or 16.
        signed: PixelRepresentation 1 (two's complement).
        rescale_slope / rescale_intercept / rescale_type: linear Modality LUT.
        modality_lut: Modality LUT Sequence data (first mapped value 0), instead of a rescale.
        window_center / window_width: one value or a list of presets;
            ``voi_lut_function`` optionally "LINEAR", "LINEAR_EXACT" or "SIGMOID".
        voi_lut: VOI LUT Sequence data; ``voi_lut_first_mapped`` is its first input value.
        palette: (N, 3) 16-bit RGB palette for PALETTE COLOR.
        transfer_syntax: a key of :data:`TRANSFER_SYNTAXES` or a UID; compressed syntaxes
            are all lossless.
        modality / sop_class: DICOM Modality and SOP Class (keyword or UID).
        pixel_spacing / view_position / body_part: written when not None.
        phi: identifying attributes; defaults to :data:`PHI_SENTINELS` (``{}`` writes none).
        uid_seed: makes the generated UIDs deterministic (same seed, same UIDs: give each
            file its own seed).
        extra: further attributes by keyword, set last (may override anything above).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tsyntax = _uid(transfer_syntax)
    sop_uid = _uid(sop_class)

    def new_uid(tag: str) -> pydicom.uid.UID:
        entropy = None if uid_seed is None else [uid_seed, tag]
        return pydicom.uid.generate_uid(entropy_srcs=entropy)

    ds = Dataset()
    ds.SOPClassUID = sop_uid
    ds.SOPInstanceUID = new_uid("sop")
    ds.StudyInstanceUID = new_uid("study")
    ds.SeriesInstanceUID = new_uid("series")
    ds.Modality = modality
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "LungViT synthetic phantom"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PatientSex = "O"
    if sop_uid == pydicom.uid.DigitalXRayImageStorageForPresentation:
        ds.PresentationIntentType = "FOR PRESENTATION"
    elif sop_uid == pydicom.uid.DigitalXRayImageStorageForProcessing:
        ds.PresentationIntentType = "FOR PROCESSING"
    for key, value in (PHI_SENTINELS if phi is None else phi).items():
        setattr(ds, key, value)
    if pixel_spacing is not None:
        ds.PixelSpacing = [_ds_value(pixel_spacing[0]), _ds_value(pixel_spacing[1])]
    if view_position is not None:
        ds.ViewPosition = view_position
    if body_part is not None:
        ds.BodyPartExamined = body_part

    _pixel_module(ds, stored, photometric, bits_stored, bits_allocated, signed, palette)
    if sop_uid in _MULTI_FRAME_IODS and "NumberOfFrames" not in ds:
        ds.NumberOfFrames = 1  # these IODs always carry the Multi-frame module
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
    if rescale_slope is not None or rescale_intercept is not None:
        ds.RescaleSlope = _ds_value(1.0 if rescale_slope is None else rescale_slope)
        ds.RescaleIntercept = _ds_value(0.0 if rescale_intercept is None else rescale_intercept)
        ds.RescaleType = rescale_type or "US"
    if modality_lut is not None:
        item = _lut_item(modality_lut, 0, "synthetic modality LUT")
        item.ModalityLUTType = rescale_type or "US"
        ds.ModalityLUTSequence = DicomSequence([item])
    if window_center is not None or window_width is not None:
        if window_center is None or window_width is None:
            raise ValueError("window_center and window_width go together")
        ds.WindowCenter = _ds_value(window_center)
        ds.WindowWidth = _ds_value(window_width)
        n = len(window_center) if isinstance(window_center, (list, tuple)) else 1
        ds.WindowCenterWidthExplanation = [f"PRESET{i + 1}" for i in range(n)] if n > 1 \
            else "PRESET1"
        if voi_lut_function is not None:
            ds.VOILUTFunction = voi_lut_function
    if voi_lut is not None:
        ds.VOILUTSequence = DicomSequence([_lut_item(voi_lut, voi_lut_first_mapped,
                                                     "synthetic VOI LUT")])

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "LUNGVIT_TEST"
    if tsyntax.is_compressed:
        _compress(ds, np.asarray(stored), tsyntax)
    else:
        ds.file_meta.TransferSyntaxUID = tsyntax
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path
