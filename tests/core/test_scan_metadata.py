"""What a scan's metadata says about its window: Hounsfield units, the window's numbers."""
from __future__ import annotations

import pytest

from lungvit.core.io.pixel_math import range_window
from lungvit.core.io.scan import ScanMetadata


@pytest.mark.parametrize(("modality", "rescale", "hu"), [
    ("CT", None, True), ("ct", {"kind": "linear"}, True), ("MR", {"type": "HU"}, True),
    ("DX", {"kind": "linear", "slope": 1.0}, False), (None, None, False)])
def test_is_hounsfield(modality: str | None, rescale: dict | None, hu: bool) -> None:
    assert ScanMetadata("dicom", modality=modality, rescale=rescale).is_hounsfield is hu


def test_window_numbers() -> None:
    assert ScanMetadata("dicom", window={"center": 40, "width": 400}).window_numbers() == (40.0, 400.0)
    low_high = ScanMetadata("png", window={"kind": "percentile", "low": 10.0, "high": 250.0})
    assert low_high.window_numbers() == range_window(10.0, 250.0) == (130.5, 241.0)
    assert ScanMetadata("dicom", window={"kind": "voi_lut"}).window_numbers() == (None, None)
    assert ScanMetadata("png").window_numbers() == (None, None)
