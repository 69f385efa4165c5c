"""Large JPEG 2000 DICOMs read at a reduced resolution level (``load_scan(min_side=...)``).

The reduced read must be the full image made smaller, never something else: values in the
file's own units (the window applies to them unchanged), MONOCHROME1 still inverted, and
any codestream the fast path does not check for read in full by pydicom.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lungvit.core.errors import ScanReadError
from lungvit.core.io.dicom import reduction_level
from lungvit.core.io.ingest import WORKING_SIDE, load_scan
from lungvit.synthetic.dicom_write import write_dicom


def smooth(rows: int, cols: int, top: int) -> np.ndarray:
    """A smooth image (a gradient and a disc) using the range 0..top."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    disc = np.hypot(yy - rows / 2, xx - cols / 2) < min(rows, cols) / 3
    image = (0.6 * xx / cols + 0.2 * yy / rows + 0.2 * disc) * top
    return np.rint(image).astype(np.uint16 if top > 255 else np.uint8)


def j2k(tmp_path: Path, stored: np.ndarray, bits: int, name: str = "dx.dcm", **kw: object
        ) -> Path:
    return write_dicom(tmp_path / name, stored, bits_stored=bits,
                       transfer_syntax="JPEG2000Lossless", **kw)


def halved(pixels: np.ndarray) -> np.ndarray:
    rows, cols = pixels.shape
    return pixels[:rows // 2 * 2, :cols // 2 * 2].reshape(rows // 2, 2, cols // 2, 2).mean((1, 3))


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_reduced_read_is_the_full_image_made_smaller(tmp_path: Path, bits: int) -> None:
    top = 2 ** bits - 1
    path = j2k(tmp_path, smooth(1600, 1200, top), bits)
    window = (top / 2, top / 2)
    full = load_scan(path, window=window)
    small = load_scan(path, window=window, min_side=WORKING_SIDE)
    assert full.meta.resolution_level == 0 and full.pixels.shape == (1600, 1200)
    assert small.meta.resolution_level == 1 and small.pixels.shape == (800, 600)
    assert small.meta.original_shape == (1600, 1200)
    # Same units, same window: the half-size image is the full one averaged 2 x 2 (the
    # wavelet's low-pass differs from a box filter only at edges).
    diff = np.abs(small.pixels - halved(full.pixels))
    assert float(np.median(diff)) < 0.005 and float(diff.mean()) < 0.01
    assert any("1/2 size" in n and "level 1" in n for n in small.meta.warnings)
    assert not any("size" in n for n in full.meta.warnings)


def test_auto_window_and_monochrome1_survive(tmp_path: Path) -> None:
    stored = smooth(2000, 1800, 4095)
    path = j2k(tmp_path, 4095 - stored, 12, photometric="MONOCHROME1")
    full = load_scan(path, window="auto")
    small = load_scan(path, window="auto", min_side=WORKING_SIDE)
    assert small.meta.inverted and full.meta.inverted
    assert small.pixels.shape == (1000, 900)
    for key in ("center", "width"):  # percentiles of the smaller image: nearly the same
        assert small.meta.window[key] == pytest.approx(full.meta.window[key], rel=0.02)
    assert float(np.abs(small.pixels - halved(full.pixels)).mean()) < 0.01
    assert small.pixels[500, 890] > small.pixels[500, 10]  # air (stored high) stays dark


def test_levels_follow_min_side(tmp_path: Path) -> None:
    path = j2k(tmp_path, smooth(2000, 1000, 4095), 12)
    shapes = {side: load_scan(path, min_side=side).pixels.shape
              for side in (2000, 1001, 1000, 500, 250)}
    assert shapes == {2000: (2000, 1000), 1001: (2000, 1000), 1000: (1000, 500),
                      500: (500, 250), 250: (250, 125)}
    assert reduction_level(2394, 1969, 768, 5) == 1
    assert reduction_level(2000, 2000, 768, 5) == 1
    assert reduction_level(1500, 1000, 768, 5) == 0  # 750 would be smaller than asked
    assert reduction_level(8000, 8000, 1, 2) == 2  # never past the file's levels
    with pytest.raises(ValueError, match="min_side"):
        load_scan(path, min_side=0)


def test_what_the_fast_path_does_not_check_is_read_in_full(tmp_path: Path) -> None:
    signed = (smooth(1600, 1600, 2000).astype(np.int16) - 1000)
    path = j2k(tmp_path, signed, 12, signed=True, name="signed.dcm")
    scan = load_scan(path, min_side=WORKING_SIDE)
    assert scan.meta.resolution_level == 0 and scan.pixels.shape == (1600, 1600)
    np.testing.assert_array_equal(scan.pixels, load_scan(path).pixels)
    native = write_dicom(tmp_path / "native.dcm", smooth(1600, 1600, 4095), bits_stored=12)
    assert load_scan(native, min_side=WORKING_SIDE).pixels.shape == (1600, 1600)


@pytest.fixture(scope="module")
def small_j2k(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("j2k")
    return j2k(d, smooth(64, 48, 4095), 12).read_bytes()


def test_small_images_take_the_reduced_path_too(small_j2k: bytes) -> None:
    scan = load_scan(small_j2k, min_side=16)
    assert scan.meta.resolution_level == 2 and scan.pixels.shape == (16, 12)


@settings(max_examples=60, deadline=5000)
@given(fraction=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.integers(0, 1 << 14), st.integers(0, 7)), max_size=8))
def test_damaged_files_give_a_scan_or_a_scan_read_error(small_j2k: bytes, fraction: float,
                                                        flips: list[tuple[int, int]]) -> None:
    data = bytearray(small_j2k)
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    data = data[: max(int(len(data) * fraction), 1)]
    try:
        scan = load_scan(bytes(data), name="dx.dcm", min_side=16)
    except ScanReadError as exc:
        assert str(exc) and "Traceback" not in str(exc)
    else:
        px = scan.pixels
        assert px.ndim == 2 and px.dtype == np.float32 and px.size > 0
        assert np.isfinite(px).all() and px.min() >= 0.0 and px.max() <= 1.0
        level, (rows, cols) = scan.meta.resolution_level, scan.meta.original_shape
        if level:  # a reduced read is exactly the declared image at that level
            assert px.shape == (-(-rows // 2 ** level), -(-cols // 2 ** level))
