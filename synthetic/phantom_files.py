"""Write phantoms as the files LungViT meets in the wild: PNG, JPEG and DICOM variants.

Every DICOM variant but one carries a window or VOI LUT under which a reader that follows
the standard gets the phantom's image back up to quantisation: MONOCHROME1 is stored
inverted, a VOI LUT undoes a non-linear stored encoding, and so on ("mono2-16" has no
window, to exercise a reader's own choice). All DICOMs carry the sentinel PHI of
:data:`~lungvit.synthetic.dicom_write.PHI_SENTINELS`, with the patient's own sentinel
PatientID ("SENTINEL-PID-P0003"), so patient-level splits by hashed PatientID work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom.uid
from PIL import Image

from lungvit.synthetic.dicom_write import PHI_MARKER, PHI_SENTINELS, write_dicom
from lungvit.synthetic.phantoms import Phantom

RASTER_FORMATS: tuple[str, ...] = ("png8", "png16", "jpeg")
DICOM_VARIANTS: tuple[str, ...] = (
    "mono2-16",        # MONOCHROME2, 16 bits stored, uncompressed, no window
    "mono2-12",        # 12 of 16 bits (this and all below: a window or LUT for display)
    "mono2-8",         # 8-bit
    "mono1",           # MONOCHROME1 (stored inverted), 12-bit
    "rescale",         # slope/intercept to HU-like values, one window
    "window-presets",  # data in a sub-range, several window center/width presets
    "voi-lut",         # non-linear stored encoding undone by a VOI LUT Sequence
    "modality-lut",    # non-linear stored encoding undone by a Modality LUT Sequence
    "signed",          # signed 16-bit with a window around zero
    "rle",             # RLE Lossless, 12-bit
    "jpeg-ls",         # JPEG-LS Lossless, 12-bit
    "jpeg2000",        # JPEG 2000 Lossless, 12-bit
    "jpeg-lossless",   # JPEG Lossless SV1 (Process 14), 12-bit
    "deflate",         # Deflated Explicit VR Little Endian, 16-bit
    "multiframe",      # three identical frames, 12-bit
    "rgb",             # grayscale stored as RGB secondary capture, 8-bit
)
FORMATS: tuple[str, ...] = (*RASTER_FORMATS, "dicom")


def _quantise(image: np.ndarray, levels: int) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * (levels - 1)).astype(np.int64)


def _window(low: float, high: float) -> dict[str, float]:
    """The DICOM LINEAR window mapping ``low``..``high`` exactly onto black..white."""
    return {"window_center": (low + high) / 2 + 0.5, "window_width": high - low + 1}


def phantom_phi(phantom: Phantom) -> dict[str, str]:
    """Sentinel PHI for one phantom: the shared sentinels, with its own PatientID/Name."""
    phi = dict(PHI_SENTINELS)
    phi["PatientID"] = f"{PHI_MARKER}-PID-{phantom.patient_id}"
    phi["PatientName"] = f"{PHI_MARKER}^PHI^{phantom.patient_id}"
    return phi


def dicom_variant(phantom: Phantom, variant: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The stored pixels and :func:`write_dicom` arguments of one DICOM variant.

    Args:
        phantom: the phantom to encode.
        variant: one of :data:`DICOM_VARIANTS`.

    Returns:
        ``(stored, kwargs)``; the modality, SOP class and PHI are not included.
    """
    img = phantom.image
    full12 = _window(0, 4095)
    if variant == "mono2-16":  # the one variant without a window: readers choose
        return _quantise(img, 65536), {"bits_stored": 16}
    if variant == "mono2-12":
        return _quantise(img, 4096), {"bits_stored": 12, **full12}
    if variant == "mono2-8":
        return _quantise(img, 256), {"bits_stored": 8, **_window(0, 255)}
    if variant == "mono1":
        return 4095 - _quantise(img, 4096), {"bits_stored": 12, "photometric": "MONOCHROME1",
                                             **full12}
    if variant == "rescale":
        return _quantise(img, 4096), {"bits_stored": 12, "rescale_slope": 0.5,
                                      "rescale_intercept": -1024.0, "rescale_type": "HU",
                                      **_window(-1024.0, 1023.5)}
    if variant == "window-presets":
        first = _window(1000, 4000)
        return 1000 + _quantise(img, 3001), {
            "bits_stored": 16, "window_center": [first["window_center"], 2000.0],
            "window_width": [first["window_width"], 1000.0]}
    if variant == "voi-lut":
        # Stored as sqrt(image); the VOI LUT squares it back onto the full 16-bit range.
        ramp = np.arange(4096) / 4095.0
        return _quantise(np.sqrt(img), 4096), {
            "bits_stored": 12, "voi_lut": np.rint(ramp**2 * 65535).astype(np.int64)}
    if variant == "modality-lut":
        ramp = np.arange(4096) / 4095.0
        return _quantise(np.sqrt(img), 4096), {
            "bits_stored": 12, "modality_lut": np.rint(ramp**2 * 4095).astype(np.int64),
            **full12}
    if variant == "signed":
        return _quantise(img, 4001) - 2000, {"bits_stored": 16, "signed": True,
                                             **_window(-2000, 2000)}
    compressed = {"rle": "RLELossless", "jpeg-ls": "JPEGLSLossless",
                  "jpeg2000": "JPEG2000Lossless", "jpeg-lossless": "JPEGLosslessSV1"}
    if variant in compressed:
        return _quantise(img, 4096), {"bits_stored": 12, "transfer_syntax": compressed[variant],
                                      **full12}
    if variant == "deflate":
        return _quantise(img, 65536), {"bits_stored": 16, **_window(0, 65535),
                                       "transfer_syntax": "DeflatedExplicitVRLittleEndian"}
    if variant == "multiframe":
        return np.repeat(_quantise(img, 4096)[None], 3, axis=0), {"bits_stored": 12, **full12}
    if variant == "rgb":
        gray = _quantise(img, 256).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), {
            "photometric": "RGB", "bits_stored": 8,
            "sop_class": pydicom.uid.SecondaryCaptureImageStorage}
    raise ValueError(f"unknown DICOM variant {variant!r}; expected one of "
                     f"{', '.join(DICOM_VARIANTS)}")


def write_phantom(phantom: Phantom, path: str | Path, *, fmt: str = "png8",
                  variant: str | None = None) -> Path:
    """Write one phantom as a PNG, JPEG or DICOM file.

    Args:
        phantom: what to write.
        path: destination file (parent folders are created; the suffix is not changed).
        fmt: "png8", "png16", "jpeg" (quality 95) or "dicom".
        variant: for "dicom", one of :data:`DICOM_VARIANTS` (default "mono2-12").

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png8" or fmt == "jpeg":
        im = Image.fromarray(_quantise(phantom.image, 256).astype(np.uint8))
        if fmt == "jpeg":
            im.save(path, format="JPEG", quality=95)
        else:
            im.save(path, format="PNG")
        return path
    if fmt == "png16":
        Image.fromarray(_quantise(phantom.image, 65536).astype(np.uint16)).save(path, format="PNG")
        return path
    if fmt != "dicom":
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    stored, kwargs = dicom_variant(phantom, variant or "mono2-12")
    if phantom.modality == "OPT":
        kwargs.setdefault("sop_class", pydicom.uid.OphthalmicTomographyImageStorage)
        kwargs.update(modality="OPT", body_part="EYE", view_position=None,
                      pixel_spacing=(0.0039, 0.0117))
    else:
        kwargs.update(modality="DX", body_part="CHEST", view_position="PA",
                      pixel_spacing=(0.2, 0.2))
    uid_key = f"{phantom.patient_id}:{phantom.seed}:{phantom.label}:{variant}"
    study = pydicom.uid.generate_uid(entropy_srcs=["study", phantom.patient_id])
    return write_dicom(path, stored, phi=phantom_phi(phantom), uid_seed=uid_key,
                       extra={"StudyInstanceUID": study,
                              "ImageComments": f"LungViT synthetic phantom: {phantom.label}"},
                       **kwargs)


def write_mask(phantom: Phantom, path: str | Path) -> Path:
    """Write the lesion mask as an 8-bit PNG (255 on lesion pixels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(phantom.mask.astype(np.uint8) * 255).save(path, format="PNG")
    return path
