"""Round-trips of :func:`lungvit.synthetic.dicom_write.write_dicom` through pydicom."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from lungvit.synthetic.dicom_write import (PHI_MARKER, PHI_SENTINELS, TRANSFER_SYNTAXES,
                                        write_dicom)
from lungvit.synthetic.jpeg_lossless import encode_jpeg_lossless_sv1

LOSSLESS = ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian",
            "RLELossless", "JPEG2000Lossless", "JPEGLSLossless", "JPEGLosslessSV1"]
DEPTHS = [(8, False), (12, False), (16, False), (12, True), (16, True)]


def _random(rng: np.random.Generator, shape: tuple[int, ...], bits: int, signed: bool
            ) -> np.ndarray:
    if signed:
        return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape)
    return rng.integers(0, 1 << bits, shape)


@pytest.mark.parametrize("syntax", LOSSLESS)
@pytest.mark.parametrize("bits,signed", DEPTHS)
@pytest.mark.parametrize("frames", [None, 3])
def test_grayscale_round_trip_is_bit_exact(tmp_path, syntax, bits, signed, frames):
    rng = np.random.default_rng(bits + 100 * signed)
    shape = (40, 50) if frames is None else (frames, 40, 50)
    # Uniform noise over the full range: the hardest case for the lossless coders.
    stored = _random(rng, shape, bits, signed)
    path = write_dicom(tmp_path / "x.dcm", stored, bits_stored=bits, signed=signed,
                       transfer_syntax=syntax)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    assert ds.BitsStored == bits and ds.PixelRepresentation == int(signed)
    assert ds.get("NumberOfFrames", 1) == (frames or 1)
    np.testing.assert_array_equal(ds.pixel_array, stored)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "JPEGLSLossless",
                                    "JPEGLosslessSV1"])
def test_compressed_equals_uncompressed_twin(tmp_path, syntax):
    y, x = np.mgrid[0:64, 0:80]
    stored = ((np.sin(x / 7.0) + np.cos(y / 5.0) + 2) * 1000).astype(np.uint16)
    native = pydicom.dcmread(write_dicom(tmp_path / "n.dcm", stored, bits_stored=12))
    packed = pydicom.dcmread(write_dicom(tmp_path / "c.dcm", stored, bits_stored=12,
                                         transfer_syntax=syntax))
    assert packed.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(packed.pixel_array, native.pixel_array)


def test_jpeg_lossless_handles_extreme_differences(tmp_path):
    # A 0/65535 checkerboard makes every difference +-32768 or close (category 16).
    board = (np.indices((33, 31)).sum(0) % 2 * 65535).astype(np.uint16)
    board[5, 7] = 1
    path = write_dicom(tmp_path / "b.dcm", board, transfer_syntax="JPEGLosslessSV1")
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, board)


def test_jpeg_lossless_rejects_out_of_range():
    with pytest.raises(ValueError):
        encode_jpeg_lossless_sv1(np.full((4, 4), 300, np.uint16), 8)


@pytest.mark.parametrize("syntax", ["ExplicitVRLittleEndian", "RLELossless", "JPEGLSLossless",
                                    "JPEG2000Lossless"])
@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_color_round_trip(tmp_path, syntax, photometric):
    rgb = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "c.dcm", rgb, photometric=photometric, transfer_syntax=syntax)
    ds = pydicom.dcmread(path)
    assert ds.SamplesPerPixel == 3
    np.testing.assert_array_equal(pixel_array(ds, as_rgb=False), rgb)


def test_palette_color(tmp_path):
    index = np.random.default_rng(2).integers(0, 256, (20, 30)).astype(np.uint8)
    palette = np.stack([np.arange(256), np.arange(256)[::-1], np.zeros(256)], 1) * 257
    ds = pydicom.dcmread(write_dicom(tmp_path / "p.dcm", index, photometric="PALETTE COLOR",
                                     bits_stored=8, palette=palette))
    np.testing.assert_array_equal(ds.pixel_array, index)
    rgb = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(rgb[..., 1], (255 - index.astype(int)) * 257)


def test_rescale_and_window_presets(tmp_path):
    stored = np.random.default_rng(3).integers(0, 4096, (20, 30))
    ds = pydicom.dcmread(write_dicom(
        tmp_path / "r.dcm", stored, bits_stored=12, rescale_slope=0.5, rescale_intercept=-1024,
        window_center=[40, -600], window_width=[400, 1500], voi_lut_function="LINEAR"))
    np.testing.assert_allclose(apply_modality_lut(ds.pixel_array, ds), stored * 0.5 - 1024)
    assert [float(v) for v in ds.WindowCenter] == [40.0, -600.0]
    assert [float(v) for v in ds.WindowWidth] == [400.0, 1500.0]
    assert len(ds.WindowCenterWidthExplanation) == 2


def test_modality_and_voi_lut_sequences(tmp_path):
    stored = np.random.default_rng(4).integers(0, 4096, (20, 30))
    mlut = np.minimum(np.arange(4096) * 16, 65535)
    vlut = np.linspace(0, 255, 65536).astype(int)
    ds = pydicom.dcmread(write_dicom(tmp_path / "l.dcm", stored, bits_stored=12,
                                     modality_lut=mlut, voi_lut=vlut))
    modality = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(modality, mlut[stored])
    np.testing.assert_array_equal(apply_voi_lut(modality, ds, index=0), vlut[mlut[stored]])


def test_voi_lut_with_negative_first_mapped_value(tmp_path):
    stored = np.random.default_rng(5).integers(0, 2048, (10, 10))
    vlut = np.arange(2048) // 8
    ds = pydicom.dcmread(write_dicom(tmp_path / "n.dcm", stored, bits_stored=12,
                                     rescale_intercept=-1024, voi_lut=vlut,
                                     voi_lut_first_mapped=-1024))
    assert ds.VOILUTSequence[0].LUTDescriptor[:2] == [2048, -1024]
    modality = apply_modality_lut(ds.pixel_array, ds).astype(np.int64)
    out = apply_voi_lut(modality, ds, index=0)
    np.testing.assert_array_equal(out, vlut[stored])


def test_phi_sentinels_written_and_greppable(tmp_path):
    path = write_dicom(tmp_path / "s.dcm", np.zeros((8, 8), np.uint16), bits_stored=16)
    ds = pydicom.dcmread(path)
    for key, value in PHI_SENTINELS.items():
        assert str(ds.data_element(key).value) == value
    raw = path.read_bytes()
    assert raw.count(PHI_MARKER.encode()) >= sum(PHI_MARKER in v for v in PHI_SENTINELS.values())
    none = pydicom.dcmread(write_dicom(tmp_path / "n.dcm", np.zeros((8, 8), np.uint8),
                                       bits_stored=8, phi={}))
    assert "PatientName" not in none
    assert PHI_MARKER.encode() not in (tmp_path / "n.dcm").read_bytes()


def test_part10_header_and_sop_class(tmp_path):
    path = write_dicom(tmp_path / "o.dcm", np.zeros((16, 16), np.uint8), bits_stored=8,
                       modality="OPT", sop_class="OphthalmicTomographyImageStorage",
                       view_position=None, body_part="EYE", uid_seed="a")
    assert path.read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    assert ds.Modality == "OPT" and ds.NumberOfFrames == 1
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == pydicom.uid.OphthalmicTomographyImageStorage
    again = pydicom.dcmread(write_dicom(tmp_path / "o2.dcm", np.zeros((16, 16), np.uint8),
                                        bits_stored=8, uid_seed="a"))
    other = pydicom.dcmread(write_dicom(tmp_path / "o3.dcm", np.zeros((16, 16), np.uint8),
                                        bits_stored=8, uid_seed="b"))
    assert again.SOPInstanceUID == ds.SOPInstanceUID != other.SOPInstanceUID


def test_extra_attributes_override(tmp_path):
    ds = pydicom.dcmread(write_dicom(tmp_path / "e.dcm", np.zeros((8, 8), np.uint8),
                                     bits_stored=8, extra={"PatientID": "SENTINEL-PID-P0003",
                                                           "ViewPosition": "AP"}))
    assert ds.PatientID == "SENTINEL-PID-P0003" and ds.ViewPosition == "AP"


@pytest.mark.parametrize("kwargs", [
    {"stored": np.full((4, 4), 300), "bits_stored": 8},
    {"stored": np.full((4, 4), -1), "bits_stored": 12},
    {"stored": np.zeros((4, 4, 3), np.uint16), "photometric": "RGB"},
    {"stored": np.zeros((4, 4), np.uint8), "photometric": "PALETTE COLOR", "bits_stored": 8},
    {"stored": np.zeros((4, 4), np.uint8), "bits_stored": 8, "window_center": 10},
    {"stored": np.zeros((4, 4), np.uint8), "bits_stored": 8, "transfer_syntax": "NoSuchSyntax"},
])
def test_invalid_inputs_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_dicom(tmp_path / "bad.dcm", **kwargs)
