"""The zoomable viewer's value: the scan as shown and each map's colour layer, the same
size, with the user's text escaped (the browser side is driven in test_browser.py)."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungvit.app.viewer import viewer_value


def decode(url: str) -> np.ndarray:
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def test_value_carries_the_pixels_and_escapes_names() -> None:
    rng = np.random.default_rng(0)
    scan = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    layer = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    value = viewer_value(scan, "<b>x</b>.png: Auto", [("map <img src=x onerror=1>", layer)],
                         opacity=1.7)
    assert np.array_equal(decode(value["scan"]), scan)
    assert np.array_equal(decode(value["layers"][0]["src"]), layer)
    assert value["caption"] == "&lt;b&gt;x&lt;/b&gt;.png: Auto"
    assert "<img" not in value["layers"][0]["name"]
    assert value["opacity"] == 1.0


def test_a_map_of_another_size_is_refused() -> None:
    with pytest.raises(ValueError, match="map 'm'"):
        viewer_value(np.zeros((40, 30), np.uint8), "c", [("m", np.zeros((30, 40, 3), np.uint8))])


def test_maps_are_the_explanations_at_the_scan_s_display_size(
        tiny_checkpoint: Path, scans: dict[str, Path], tmp_path: Path) -> None:
    """After Explain the viewer shows each map over the scan as displayed: the layer is the
    colour map alone (opacity 1; the browser blends it), aligned with the scan."""
    from lungvit.app import handlers as h
    from lungvit.app.state import make_context
    from lungvit.app.windows import AUTO
    from lungvit.core.explain import render_overlay

    ctx = make_context(tiny_checkpoint, data_dir=tmp_path)
    files = [str(scans["dicom"])]
    shown = h.view_scan(ctx, files, None, AUTO, None, None)
    assert shown["layers"] == [] and shown["caption"].startswith("chest.dcm: Auto")
    methods = ["Attention rollout", "Grad-CAM"]
    h.explain_scan(ctx, files, None, AUTO, None, None, methods, h.PREDICTED, 0.3)
    value = h.view_maps(ctx, files, None, AUTO, None, None, methods, h.PREDICTED, 0.3)
    scan = decode(value["scan"])
    assert np.array_equal(scan, decode(shown["scan"]))
    assert [lay["name"].split(" for ")[0] for lay in value["layers"]] == methods
    assert all("than random" in lay["name"] for lay in value["layers"])
    assert value["opacity"] == 0.3
    _, _, _, result = h._explained(ctx, files, None, AUTO, None, None, methods, h.PREDICTED,
                                   None)
    for lay, e in zip(value["layers"], result):
        expected = render_overlay(e, scan.astype(np.float32) / 255.0, opacity=1.0)
        assert np.array_equal(decode(lay["src"]), expected)
