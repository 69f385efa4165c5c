"""PNG and JPEG ingestion: full precision, luminance, transparency, EXIF orientation."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lungvit.core.errors import CorruptFileError
from lungvit.core.io.ingest import load_scan


def _png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def test_8bit_png_is_exact():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    scan = load_scan(_png(arr), name="ramp.png")
    np.testing.assert_array_equal(scan.pixels, arr.astype(np.float32) / 255.0)
    m = scan.meta
    assert m.source_format == "png" and m.bits_stored == 8 and m.name == "ramp.png"
    assert m.photometric_interpretation == "L" and m.original_shape == (16, 16)
    assert m.warnings == [] and m.color_saturation is None and m.modality is None


def test_16bit_png_ramp_keeps_full_precision():
    ramp = np.linspace(0, 65535, 1024).astype(np.uint16)[None].repeat(4, axis=0)
    scan = load_scan(_png(ramp), name="ramp16.png")
    assert len(np.unique(scan.pixels)) >= 250          # the spec's floor
    assert len(np.unique(scan.pixels)) == len(np.unique(ramp))  # in fact every level
    np.testing.assert_allclose(scan.pixels, ramp / 65535.0, atol=1e-7)
    assert scan.meta.bits_stored == 16 and scan.meta.warnings == []


def test_12bit_data_in_a_16bit_png_is_scaled_as_12bit_with_a_note():
    arr = np.linspace(0, 4095, 512).astype(np.uint16)[None].repeat(2, axis=0)
    scan = load_scan(_png(arr))
    np.testing.assert_allclose(scan.pixels, arr / 4095.0, atol=1e-7)
    assert scan.pixels.max() == 1.0
    assert any("12-bit" in w for w in scan.meta.warnings)
    assert scan.meta.window == {"kind": "full_range", "low": 0.0, "high": 4095.0}


def test_rgb_png_becomes_luminance_with_warning():
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)
    rgb[:, 10:] = (10, 200, 30)
    scan = load_scan(_png(rgb))
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    np.testing.assert_allclose(scan.pixels, expected, atol=1e-5)
    assert any("luminance" in w for w in scan.meta.warnings)
    assert scan.meta.color_saturation == pytest.approx((255 + 190) / 2 / 255.0, abs=1e-6)


def test_grey_stored_as_rgb_has_no_saturation():
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    scan = load_scan(_png(np.stack([gray] * 3, axis=-1)))
    np.testing.assert_allclose(scan.pixels, gray / 255.0, atol=1e-5)
    assert scan.meta.color_saturation == 0.0


def test_rgba_and_la_are_composited_on_black():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = np.array([0, 85, 170, 255], np.uint8)[None]
    scan = load_scan(_png(rgba))
    np.testing.assert_allclose(scan.pixels, (200 / 255.0) * rgba[..., 3] / 255.0, atol=1e-5)
    assert any("transparency" in w for w in scan.meta.warnings)
    la = np.stack([np.full((4, 4), 200, np.uint8), rgba[..., 3]], axis=-1)
    scan = load_scan(_png(la, mode="LA"))
    np.testing.assert_allclose(scan.pixels, (200 / 255.0) * la[..., 1] / 255.0, atol=1e-5)
    assert scan.meta.color_saturation is None  # LA is grey


def test_palette_png_is_expanded_then_converted():
    im = Image.new("P", (8, 8))
    im.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 1] * 16)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    scan = load_scan(buf.getvalue())
    assert scan.pixels[0, :4].tolist() == pytest.approx([0.0, 1.0, 0.299, 1.0], abs=1e-5)
    assert any("palette" in w for w in scan.meta.warnings)


def test_one_bit_png():
    arr = np.zeros((8, 8), bool)
    arr[:, 4:] = True
    scan = load_scan(_png(arr))
    np.testing.assert_array_equal(scan.pixels, arr.astype(np.float32))


@pytest.mark.parametrize("orientation", [6, 3, 8])
def test_exif_orientation_is_honoured(orientation):
    # 64 wide x 32 high, the left half white: its position after the rotation shows the
    # transform was applied (JPEG is lossy, so only block means are compared).
    arr = np.zeros((32, 64), np.uint8)
    arr[:, :32] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    scan = load_scan(buf.getvalue(), name="x.jpg")
    # Orientation 6 = rotate 90 degrees clockwise to display; 8 = counter-clockwise;
    # 3 = 180 degrees. np.rot90 turns counter-clockwise for positive k.
    expected = np.rot90(arr, {6: -1, 3: 2, 8: 1}[orientation]) / 255.0
    assert scan.pixels.shape == expected.shape
    assert np.abs(scan.pixels - expected).mean() < 0.02
    assert any("EXIF" in w for w in scan.meta.warnings)
    assert scan.meta.source_format == "jpeg"


def test_grayscale_jpeg_reads_close_to_its_source():
    arr = (np.add.outer(np.arange(48), np.arange(48)) * 2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    scan = load_scan(buf.getvalue())
    assert np.abs(scan.pixels - arr / 255.0).max() < 0.05
    assert scan.meta.warnings == []


def test_window_override_on_a_png_uses_its_pixel_values():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    scan = load_scan(_png(arr), window=(100.5, 51.0))  # LINEAR: 75..125 -> 0..1
    expected = np.clip((arr - 100.0) / 50.0 + 0.5, 0, 1)
    np.testing.assert_allclose(scan.pixels, expected, atol=1e-6)
    assert scan.meta.window["source"] == "override"


def test_truncated_png_is_corrupt():
    data = _png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(CorruptFileError, match="truncated or damaged"):
        load_scan(data[: len(data) // 2], name="half.png")


def test_png_named_jpg_is_read_with_a_warning(tmp_path):
    path = tmp_path / "scan.jpg"
    path.write_bytes(_png(np.zeros((4, 4), np.uint8)))
    scan = load_scan(path)
    assert scan.meta.source_format == "png"
    assert any(".jpg" in w and "PNG" in w for w in scan.meta.warnings)


def test_named_windows_are_computed_from_the_image():
    rng = np.random.default_rng(3)
    gray = rng.integers(40, 200, (50, 60)).astype(np.uint8)
    gray[0, 0], gray[-1, -1] = 0, 255  # lone outliers the percentile window ignores
    data = _png(gray)
    lo, hi = np.percentile(gray.astype(np.float64), [0.5, 99.5])
    auto = load_scan(data, window="auto")
    assert auto.meta.window["range"] == "auto" and auto.meta.window["source"] == "override"
    np.testing.assert_allclose(auto.pixels, np.clip((gray - lo) / (hi - lo), 0, 1), atol=1e-5)
    full = load_scan(data, window="minmax")
    np.testing.assert_allclose(full.pixels, gray / 255.0, atol=1e-5)
    blank = load_scan(_png(np.full((8, 8), 90, np.uint8)), window="auto")
    assert blank.meta.window["kind"] == "full_range"  # the file's own window was kept
    assert any("same value" in w for w in blank.meta.warnings)
    with pytest.raises(ValueError, match="auto"):
        load_scan(data, window="percentile")


def test_colour_note_only_when_the_image_had_colour():
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    assert not any("luminance" in w for w in load_scan(_png(np.stack([gray] * 3, -1))).meta.warnings)
    rgb = np.stack([gray, gray // 2, gray // 4], axis=-1)
    assert any("luminance" in w for w in load_scan(_png(rgb)).meta.warnings)
