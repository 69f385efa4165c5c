"""Display windows by modality: CT Hounsfield presets; file, auto, full range for the rest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungvit.app import windows as w
from lungvit.synthetic.dicom_write import write_dicom


@pytest.fixture(scope="module")
def stored() -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:60, 0:50]
    body = (np.hypot(yy - 30, xx - 25) < 20) * 2000 + rng.integers(0, 400, (60, 50))
    body[0, 0], body[59, 49] = 5, 3900  # a lone dark and a lone bright pixel (outliers)
    return body.astype(np.uint16)


@pytest.fixture(scope="module")
def files(stored: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("windows")
    dx = write_dicom(root / "dx.dcm", stored, bits_stored=12, window_center=1000,
                     window_width=3000)
    mono1 = write_dicom(root / "mono1.dcm", stored, bits_stored=12,
                        photometric="MONOCHROME1")
    ct = write_dicom(root / "ct.dcm", stored.astype(np.int16), bits_stored=16, signed=True,
                     rescale_slope=1.0, rescale_intercept=-1024.0, rescale_type="HU",
                     modality="CT", sop_class="CTImageStorage", window_center=40,
                     window_width=400)
    png = root / "oct.png"
    Image.fromarray((stored >> 4).astype(np.uint8)).save(png)
    return {"dx": dx, "mono1": mono1, "ct": ct, "png": png}


def expected_range(values: np.ndarray, kind: str) -> tuple[float, float]:
    if kind == "minmax":
        return float(values.min()), float(values.max())
    lo, hi = np.percentile(values.astype(np.float64), [0.5, 99.5])
    return float(lo), float(hi)


def test_presets_follow_the_modality(files: dict[str, Path]) -> None:
    dx = w.load_windowed(files["dx"], w.FILE, None, None)
    ct = w.load_windowed(files["ct"], w.FILE, None, None)
    png = w.load_windowed(files["png"], w.FILE, None, None)
    assert not set(w.CT_PRESETS) & set(w.presets_for(dx.scan.meta))
    assert not set(w.CT_PRESETS) & set(w.presets_for(png.scan.meta))
    assert set(w.CT_PRESETS) <= set(w.presets_for(ct.scan.meta))
    for meta in (dx.scan.meta, ct.scan.meta, png.scan.meta, None):
        assert {w.FILE, w.AUTO, w.FULL, w.CUSTOM} <= set(w.presets_for(meta))
    assert dx.window is None and w.numbers_of(dx.scan.meta) == (1000.0, 3000.0)
    assert w.numbers_of(ct.scan.meta) == (40.0, 400.0)


def test_ct_preset_is_hounsfield_on_ct_and_refused_elsewhere(files: dict[str, Path],
                                                            stored: np.ndarray) -> None:
    ct = w.load_windowed(files["ct"], "CT lung", None, None)
    assert ct.window == (-600.0, 1500.0) and ct.preset == "CT lung"
    hu = stored.astype(np.float64) - 1024.0
    expected = np.clip((hu - (-600 - 0.5)) / (1500 - 1) + 0.5, 0, 1)  # PS3.3 LINEAR
    np.testing.assert_allclose(ct.scan.pixels, expected, atol=1e-5)
    dx = w.load_windowed(files["dx"], "CT bone", None, None)
    assert dx.window is None and dx.preset == w.FILE
    assert "Hounsfield" in dx.notes[0] and "DX" in dx.notes[0]


@pytest.mark.parametrize("name", ["dx", "mono1", "ct", "png"])
@pytest.mark.parametrize("preset,kind", [(w.AUTO, "percentile"), (w.FULL, "minmax")])
def test_auto_and_full_range_windows(files: dict[str, Path], stored: np.ndarray, name: str,
                                     preset: str, kind: str) -> None:
    values = {"dx": stored, "mono1": stored, "ct": stored.astype(np.float64) - 1024.0,
              "png": (stored >> 4).astype(np.float64)}[name]
    lo, hi = expected_range(values, kind)
    shown = w.load_windowed(files[name], preset, None, None)
    assert shown.preset == preset
    center, width = shown.window
    assert center == pytest.approx((lo + hi) / 2 + 0.5, abs=0.6)
    assert width == pytest.approx(hi - lo + 1, abs=1.1)
    px = shown.scan.pixels
    dark, bright = (1.0, 0.0) if name == "mono1" else (0.0, 1.0)  # MONOCHROME1: inverted
    assert px[values <= lo].mean() == pytest.approx(dark, abs=1e-3)
    assert px[values >= hi].mean() == pytest.approx(bright, abs=1e-3)
    if kind == "minmax":
        inside = (values > lo) & (values < hi)
        assert 0.0 < px[inside].min() and px[inside].max() < 1.0


def test_custom_window_needs_both_numbers(files: dict[str, Path]) -> None:
    with pytest.raises(w.WindowError, match="width of at least 1"):
        w.load_windowed(files["dx"], w.CUSTOM, 100.0, None)
    with pytest.raises(w.WindowError):
        w.load_windowed(files["dx"], w.CUSTOM, 100.0, 0.5)
    shown = w.load_windowed(files["dx"], w.CUSTOM, 2000.0, 500.0)
    assert shown.window == (2000.0, 500.0)
    assert shown.scan.meta.window["center"] == 2000.0
