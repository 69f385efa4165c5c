"""DICOM ingestion: the display pipeline, compared with independently computed values."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pydicom
import pydicom.uid
import pytest
from pydicom.dataset import Dataset, FileMetaDataset

from lungvit.synthetic.dicom_write import PHI_MARKER, PHI_SENTINELS, write_dicom
from lungvit.core.errors import (CorruptFileError, NoPixelDataError, ScanReadError,
                                 UnsupportedImageError)
from lungvit.core.io.ingest import load_scan
from lungvit.core.io.phi import PATIENT_KEY_CONTEXT, installation_secret, patient_key

LOSSLESS = ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian",
            "DeflatedExplicitVRLittleEndian", "RLELossless", "JPEG2000Lossless",
            "JPEGLSLossless", "JPEGLosslessSV1"]


def _noise(shape, bits, seed=0, signed=False):
    rng = np.random.default_rng(seed)
    if signed:
        return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape)
    return rng.integers(0, 1 << bits, shape)


def _ps33_window(x: float, c: float, w: float, function: str) -> float:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3, written out case by case, output 0..1."""
    if function == "LINEAR":
        if x <= c - 0.5 - (w - 1) / 2:
            return 0.0
        if x > c - 0.5 + (w - 1) / 2:
            return 1.0
        return (x - (c - 0.5)) / (w - 1) + 0.5
    if function == "LINEAR_EXACT":
        if x <= c - w / 2:
            return 0.0
        if x > c + w / 2:
            return 1.0
        return (x - c) / w + 0.5
    return 1.0 / (1.0 + math.exp(-4.0 * (x - c) / w))


# ---------------------------------------------------------------- display pipeline


def test_monochrome1_equals_inverted_monochrome2_twin(tmp_path):
    stored = _noise((48, 40), 12)
    kw = dict(bits_stored=12, window_center=1800, window_width=2500)
    m2 = load_scan(write_dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2", **kw))
    m1 = load_scan(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", **kw))
    assert m1.meta.inverted and not m2.meta.inverted
    np.testing.assert_allclose(m1.pixels, 1.0 - m2.pixels, atol=1e-6)
    # The other twin: MONOCHROME1 storing (max - value) with the mirrored window shows
    # the same picture as MONOCHROME2 storing the value (LINEAR_EXACT is symmetric).
    kw_exact = dict(bits_stored=12, voi_lut_function="LINEAR_EXACT", window_width=2500)
    a = load_scan(write_dicom(tmp_path / "a.dcm", stored, window_center=1800, **kw_exact))
    b = load_scan(write_dicom(tmp_path / "b.dcm", 4095 - stored, photometric="MONOCHROME1",
                              window_center=4095 - 1800, **kw_exact))
    np.testing.assert_allclose(a.pixels, b.pixels, atol=1e-6)
    assert a.pixels.std() > 0.1  # not a blank picture that would match trivially


@pytest.mark.parametrize("window", [(-600.0, 1500.0), None])
def test_shifting_stored_values_and_intercept_together_changes_nothing(tmp_path, window):
    stored = _noise((40, 40), 12, seed=1)
    kw = {} if window is None else dict(window_center=window[0], window_width=window[1])
    base = load_scan(write_dicom(tmp_path / "a.dcm", stored, bits_stored=16,
                                 rescale_slope=1.0, rescale_intercept=-1024.0, **kw))
    shifted = load_scan(write_dicom(tmp_path / "b.dcm", stored + 20000, bits_stored=16,
                                    rescale_slope=1.0, rescale_intercept=-21024.0, **kw))
    np.testing.assert_allclose(base.pixels, shifted.pixels, atol=1e-6)
    assert base.meta.rescale == {"kind": "linear", "slope": 1.0, "intercept": -1024.0,
                                 "type": "US"}
    assert base.pixels.std() > 0.05


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_matches_the_standard_formula(tmp_path, function):
    stored = np.arange(0, 4096, 8).reshape(16, 32)
    slope, intercept, c, w = 0.5, -100.0, 300.0, 700.0
    scan = load_scan(write_dicom(tmp_path / "w.dcm", stored, bits_stored=12,
                                 rescale_slope=slope, rescale_intercept=intercept,
                                 window_center=c, window_width=w, voi_lut_function=function))
    expected = np.array([[_ps33_window(v * slope + intercept, c, w, function) for v in row]
                         for row in stored])
    np.testing.assert_allclose(scan.pixels, expected, atol=2e-6)
    assert scan.meta.window == {"kind": "window", "center": c, "width": w,
                                "function": function, "source": "file"}
    assert 0.0 < scan.pixels.mean() < 1.0


def test_first_of_several_window_presets_is_used_and_reported(tmp_path):
    stored = np.arange(1024).reshape(32, 32)
    scan = load_scan(write_dicom(tmp_path / "p.dcm", stored, bits_stored=10,
                                 window_center=[400, 800], window_width=[200, 100]))
    expected = np.vectorize(lambda v: _ps33_window(v, 400, 200, "LINEAR"))(stored)
    np.testing.assert_allclose(scan.pixels, expected, atol=2e-6)
    assert any("2 window presets" in w for w in scan.meta.warnings)


def test_voi_lut_is_applied_before_monochrome1_inversion(tmp_path):
    stored = np.arange(4096).reshape(64, 64)
    lut = np.round((np.arange(4096) / 4095.0) ** 2 * 65535).astype(np.uint16)  # a gamma curve
    scan = load_scan(write_dicom(tmp_path / "v.dcm", stored, bits_stored=12,
                                 photometric="MONOCHROME1", voi_lut=lut))
    right = 1.0 - lut[stored] / 65535.0        # VOI LUT, then inversion (PS3.4 N.2)
    wrong = lut[4095 - stored] / 65535.0       # inversion first, then the LUT
    np.testing.assert_allclose(scan.pixels, right, atol=1e-6)
    assert np.abs(right - wrong).max() > 0.4   # the order matters in this case
    assert scan.meta.window["kind"] == "voi_lut" and scan.meta.inverted


def test_voi_lut_wins_over_window_and_follows_the_rescale(tmp_path):
    stored = np.arange(2048).reshape(32, 64)
    lut = np.linspace(0, 4095, 1000).astype(np.uint16)  # 12-bit output, first mapped -500
    scan = load_scan(write_dicom(tmp_path / "v.dcm", stored, bits_stored=12,
                                 rescale_slope=1.0, rescale_intercept=-1000.0,
                                 window_center=0, window_width=10,
                                 voi_lut=lut, voi_lut_first_mapped=-500))
    idx = np.clip(stored - 1000 + 500, 0, lut.size - 1)
    lut_bits_used = 12  # the writer declares 16-bit entries; the table only uses 12 bits
    np.testing.assert_allclose(scan.pixels, lut[idx] / (2**lut_bits_used - 1), atol=1e-6)
    assert any("use only 12 bits" in w for w in scan.meta.warnings)


def test_modality_lut_sequence_then_window(tmp_path):
    stored = np.arange(1024).reshape(32, 32)
    mlut = (3 * np.arange(1024) + 7).astype(np.uint16)
    scan = load_scan(write_dicom(tmp_path / "m.dcm", stored, bits_stored=10,
                                 modality_lut=mlut, window_center=1500, window_width=1000))
    expected = np.vectorize(lambda v: _ps33_window(3 * v + 7, 1500, 1000, "LINEAR"))(stored)
    np.testing.assert_allclose(scan.pixels, expected, atol=2e-6)
    assert scan.meta.rescale["kind"] == "lut_sequence"


def test_window_override_replaces_the_file_window(tmp_path):
    stored = np.arange(4096).reshape(64, 64)
    path = write_dicom(tmp_path / "o.dcm", stored, bits_stored=12, window_center=100,
                       window_width=50, rescale_intercept=-1024.0, rescale_slope=1.0)
    scan = load_scan(path, window=(0.0, 2000.0))
    expected = np.vectorize(lambda v: _ps33_window(v - 1024, 0.0, 2000.0, "LINEAR"))(stored)
    np.testing.assert_allclose(scan.pixels, expected, atol=2e-6)
    assert scan.meta.window["source"] == "override"
    with pytest.raises(ValueError):
        load_scan(path, window=(0.0, 0.5))


def test_no_window_uses_a_reported_robust_percentile_window(tmp_path):
    stored = _noise((100, 100), 12, seed=3)
    stored[0, :5] = 4095  # a few burnt-in bright pixels must not set the white point
    stored[1, :5] = 0
    scan = load_scan(write_dicom(tmp_path / "n.dcm", stored, bits_stored=12))
    lo, hi = np.percentile(stored, [0.5, 99.5])
    assert scan.meta.window["kind"] == "percentile"
    assert scan.meta.window["low"] == pytest.approx(lo, abs=25)
    assert scan.meta.window["high"] == pytest.approx(hi, abs=25)
    assert any("percentile" in w for w in scan.meta.warnings)
    assert scan.pixels.min() == 0.0 and scan.pixels.max() == 1.0


def test_signed_ct_like_data_with_rescale(tmp_path):
    stored = _noise((40, 40), 12, seed=4, signed=True)
    scan = load_scan(write_dicom(tmp_path / "ct.dcm", stored, bits_stored=12, signed=True,
                                 rescale_slope=2.0, rescale_intercept=-10.0,
                                 window_center=40, window_width=400, modality="CT",
                                 sop_class="CTImageStorage"))
    expected = np.vectorize(lambda v: _ps33_window(2 * v - 10, 40, 400, "LINEAR"))(stored)
    np.testing.assert_allclose(scan.pixels, expected, atol=2e-6)


# ---------------------------------------------------------------- syntaxes and frames


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_every_lossless_transfer_syntax_decodes_to_the_same_pixels(tmp_path, syntax):
    stored = _noise((64, 48), 12, seed=5)
    kw = dict(bits_stored=12, window_center=2000, window_width=3000)
    ref = load_scan(write_dicom(tmp_path / "ref.dcm", stored, **kw))
    scan = load_scan(write_dicom(tmp_path / "x.dcm", stored, transfer_syntax=syntax, **kw))
    np.testing.assert_array_equal(scan.pixels, ref.pixels)
    assert scan.meta.transfer_syntax == pydicom.uid.UID(
        getattr(pydicom.uid, syntax)).name


@pytest.mark.parametrize("syntax", ["ExplicitVRLittleEndian", "RLELossless"])
def test_multiframe_reads_one_frame_default_middle_and_reports_it(tmp_path, syntax,
                                                                  monkeypatch):
    frames = np.stack([np.full((32, 32), 100 * i) + np.arange(32) for i in range(9)])
    path = write_dicom(tmp_path / "mf.dcm", frames, bits_stored=12, transfer_syntax=syntax,
                       window_center=2048, window_width=4096,
                       sop_class="MultiFrameGrayscaleWordSecondaryCaptureImageStorage")
    calls = []
    runner = pydicom.pixels.decoders.base.DecodeRunner
    original = runner.decode
    monkeypatch.setattr(runner, "decode",
                        lambda self, index: calls.append(index) or original(self, index))
    scan = load_scan(path)
    assert scan.pixels.shape == (32, 32)  # one frame, never frames as channels
    assert scan.meta.frame_used == 4 and scan.meta.number_of_frames == 9
    assert any("9 frames" in w and "frame 4" in w for w in scan.meta.warnings)
    expected = np.vectorize(lambda v: _ps33_window(v, 2048, 4096, "LINEAR"))(frames[4])
    np.testing.assert_allclose(scan.pixels, expected, atol=2e-6)
    if syntax == "RLELossless":
        assert calls == [4]  # only the chosen frame was decompressed
    first = load_scan(path, frame=0)
    assert first.meta.frame_used == 0
    np.testing.assert_allclose(
        first.pixels, np.vectorize(lambda v: _ps33_window(v, 2048, 4096, "LINEAR"))(frames[0]),
        atol=2e-6)
    with pytest.raises(ScanReadError, match="9 frame"):
        load_scan(path, frame=9)


# ---------------------------------------------------------------- colour


def test_rgb_dicom_becomes_luminance_with_warning_and_saturation(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[:, 15:, 1] = 100
    scan = load_scan(write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB", bits_stored=8))
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    np.testing.assert_allclose(scan.pixels, expected, atol=1e-5)
    assert any("luminance" in w for w in scan.meta.warnings)
    chroma = (rgb.max(-1).astype(float) - rgb.min(-1)).mean() / 255.0
    assert scan.meta.color_saturation == pytest.approx(chroma, abs=1e-6)


def test_palette_color_dicom_becomes_luminance(tmp_path):
    palette = np.stack([np.arange(256) * 257, np.zeros(256), 65535 - np.arange(256) * 257],
                       axis=1).astype(np.uint16)
    stored = np.arange(256).reshape(16, 16)
    scan = load_scan(write_dicom(tmp_path / "p.dcm", stored, photometric="PALETTE COLOR",
                                 bits_stored=8, palette=palette))
    rgb = palette[stored] / 65535.0
    expected = 0.299 * rgb[..., 0] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(scan.pixels, expected, atol=1e-5)
    assert scan.meta.color_saturation > 0.5


def test_ybr_full_dicom_becomes_luminance(tmp_path):
    ybr = np.zeros((8, 8, 3), np.uint8)
    ybr[..., 0] = np.arange(64).reshape(8, 8) * 4
    ybr[..., 1:] = 128  # no chroma: Y is the luminance
    scan = load_scan(write_dicom(tmp_path / "y.dcm", ybr, photometric="YBR_FULL",
                                 bits_stored=8))
    np.testing.assert_allclose(scan.pixels, ybr[..., 0] / 255.0, atol=2.5 / 255)
    assert scan.meta.color_saturation < 0.02


# ---------------------------------------------------------------- refusals


def _bare(sop_class, **attrs) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = attrs.pop("_ts", pydicom.uid.ExplicitVRLittleEndian)
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("sop,words", [
    (pydicom.uid.RTPlanStorage, "RT Plan"),
    (pydicom.uid.TwelveLeadECGWaveformStorage, "ECG"),
    (pydicom.uid.ComprehensiveSRStorage, "SR"),
])
def test_objects_without_pixels_name_their_sop_class(sop, words):
    with pytest.raises(NoPixelDataError, match=words):
        load_scan(_bare(sop, Modality="OT"), name="thing.dcm")


def test_unsupported_photometric_is_refused(tmp_path):
    path = write_dicom(tmp_path / "h.dcm", np.zeros((4, 4), np.uint16), bits_stored=8)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "HSV"
    ds.save_as(path)
    with pytest.raises(UnsupportedImageError, match="HSV"):
        load_scan(path)


def test_undecodable_transfer_syntax_is_refused_by_name(tmp_path):
    path = write_dicom(tmp_path / "v.dcm", np.zeros((4, 4), np.uint16), bits_stored=8,
                       transfer_syntax="RLELossless")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # video: no decoder exists
    ds.save_as(path)
    with pytest.raises(UnsupportedImageError, match="MPEG2"):
        load_scan(path)


def test_truncated_pixel_data_is_corrupt(tmp_path):
    path = write_dicom(tmp_path / "t.dcm", _noise((64, 64), 12), bits_stored=12)
    data = path.read_bytes()
    with pytest.raises(CorruptFileError, match="truncated"):
        load_scan(data[:-2000], name="t.dcm")


# ---------------------------------------------------------------- metadata and PHI


def test_every_metadata_field_is_filled(tmp_path):
    path = write_dicom(tmp_path / "sub" / "chest.dcm", _noise((40, 36), 12), bits_stored=12,
                       photometric="MONOCHROME1", window_center=2000, window_width=4000,
                       rescale_slope=1.0, rescale_intercept=-5.0, pixel_spacing=(0.15, 0.16),
                       view_position="AP", body_part="CHEST", modality="CR",
                       sop_class="ComputedRadiographyImageStorage",
                       transfer_syntax="JPEG2000Lossless")
    m = load_scan(str(path)).meta
    assert m.source_format == "dicom" and m.name == "chest.dcm"
    assert m.modality == "CR" and m.photometric_interpretation == "MONOCHROME1"
    assert m.bits_stored == 12 and m.inverted
    assert m.rescale["intercept"] == -5.0 and m.window["kind"] == "window"
    assert m.frame_used == 0 and m.number_of_frames == 1 and m.original_shape == (40, 36)
    assert m.pixel_spacing == (0.15, 0.16) and m.view_position == "AP"
    assert m.body_part == "CHEST"
    assert m.transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)"
    assert m.sop_class == "Computed Radiography Image Storage"
    assert m.patient_key and m.color_saturation is None and m.phi is None
    assert str(tmp_path) not in repr(m)


def test_phi_stays_out_of_metadata_unless_asked(tmp_path):
    path = write_dicom(tmp_path / "phi.dcm", _noise((16, 16), 8), bits_stored=8)
    meta = load_scan(path).meta
    text = repr(meta.to_dict())
    assert PHI_MARKER not in text
    for value in PHI_SENTINELS.values():
        assert value not in text
    shown = load_scan(path, include_phi=True).meta.phi
    for key, value in PHI_SENTINELS.items():
        assert shown[key] == value


def test_patient_key_is_stable_keyed_and_not_the_id(tmp_path):
    a = load_scan(write_dicom(tmp_path / "a.dcm", _noise((8, 8), 8), bits_stored=8)).meta
    b = load_scan(write_dicom(tmp_path / "b.dcm", _noise((8, 8), 8, seed=9), bits_stored=8,
                              transfer_syntax="RLELossless")).meta
    other = load_scan(write_dicom(tmp_path / "c.dcm", _noise((8, 8), 8), bits_stored=8,
                                  phi={"PatientID": "SENTINEL-PID-0002"})).meta
    raw = PHI_SENTINELS["PatientID"]
    assert a.patient_key == b.patient_key != other.patient_key
    assert raw not in a.patient_key and a.patient_key != raw
    import hashlib
    import hmac
    expected = hmac.new(installation_secret(), PATIENT_KEY_CONTEXT + raw.encode(),
                        hashlib.sha256).hexdigest()[:20]
    assert a.patient_key == expected
    assert patient_key(raw) == a.patient_key and patient_key("  ") is None


def test_pydicom_warnings_that_quote_values_do_not_leak(tmp_path, capsys, caplog):
    # pydicom warns (and logs) "Invalid value for VR IS: '<the value>'" when it converts
    # a malformed number; a value like that can carry identifying text.
    path = write_dicom(tmp_path / "w.dcm", _noise((8, 8), 8), bits_stored=8,
                       extra={"NumberOfFrames": "12345678"})
    data = path.read_bytes()
    assert data.count(b"12345678") == 1
    path.write_bytes(data.replace(b"12345678", b"SENTINEL"))
    caplog.set_level("DEBUG")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = load_scan(path, include_phi=True)
        with pytest.warns(UserWarning, match="SENTINEL"):  # the path really does quote it
            pydicom.dcmread(path).get("NumberOfFrames")
    assert scan.meta.number_of_frames == 1
    assert scan.meta.phi["PatientName"] == PHI_SENTINELS["PatientName"]
    assert any("irregularit" in w for w in scan.meta.warnings)
    out = capsys.readouterr()
    leaked = (out.out + out.err + " ".join(r.getMessage() for r in caplog.records
                                           if r.name != "pydicom")
              + " ".join(str(w.message) for w in caught))
    assert PHI_MARKER not in leaked
    assert PHI_MARKER not in " ".join(scan.meta.warnings)


def test_unreadable_identifying_values_do_not_break_reading(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", _noise((8, 8), 8), bits_stored=8,
                       extra={"PatientWeight": "12345678", "PixelSpacing": ["0.1", "0.2"]})
    data = path.read_bytes()
    path.write_bytes(data.replace(b"12345678", b"SENTINEL").replace(b"0.1\\0.2", b"x.1\\0.2"))
    scan = load_scan(path, include_phi=True)
    assert scan.meta.phi["PatientWeight"] == "SENTINEL"
    assert scan.meta.pixel_spacing is None


# ---------------------------------------------------------------- sources and sniffing


def test_raw_dataset_without_preamble_is_read(tmp_path):
    stored = _noise((16, 16), 8)
    path = write_dicom(tmp_path / "r.dcm", stored, bits_stored=8, window_center=128,
                       window_width=256, transfer_syntax="ImplicitVRLittleEndian")
    data = path.read_bytes()
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) group length
    body = data[144 + meta_length:]  # no preamble, no "DICM", no file meta
    assert body[:2] == b"\x08\x00"
    scan = load_scan(body, name="raw")
    ref = load_scan(path)
    np.testing.assert_array_equal(scan.pixels, ref.pixels)
    assert any("no DICOM file header" in w for w in scan.meta.warnings)


def test_extension_that_lies_is_read_by_content_with_warning(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", _noise((16, 16), 8), bits_stored=8)
    liar = tmp_path / "scan.png"
    liar.write_bytes(path.read_bytes())
    scan = load_scan(liar)
    assert scan.meta.source_format == "dicom"
    assert any(".png" in w and "DICOM" in w for w in scan.meta.warnings)


def test_bytes_and_file_objects_report_only_a_base_name(tmp_path):
    path = write_dicom(tmp_path / "deep" / "f.dcm", _noise((8, 8), 8), bits_stored=8)
    with open(path, "rb") as fh:
        assert load_scan(fh).meta.name == "f.dcm"
    assert load_scan(path.read_bytes(), name=str(path)).meta.name == "f.dcm"
    assert load_scan(path.read_bytes()).meta.name is None
