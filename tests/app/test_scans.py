"""The app's scan cache: one decode per upload content and window, shared by events."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungvit.app import windows as w
from lungvit.app.scans import ScanCache
from lungvit.core.io.ingest import load_scan


@pytest.fixture
def png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "scan.png"
    Image.fromarray(rng.integers(20, 230, (40, 50)).astype(np.uint8)).save(path)
    return path


def counting_cache(**kwargs: object) -> tuple[ScanCache, list[object]]:
    calls: list[object] = []

    def reader(data: bytes, **kw: object) -> object:
        calls.append(kw.get("window"))
        return load_scan(data, **kw)

    return ScanCache(reader=reader, **kwargs), calls


def test_one_decode_per_content_and_window(png: Path, tmp_path: Path) -> None:
    cache, calls = counting_cache()
    first = w.load_windowed(png, w.AUTO, None, None, read=cache.scan)
    again = w.load_windowed(png, w.AUTO, None, None, read=cache.scan)
    assert again.scan is first.scan and calls == ["auto"]
    np.testing.assert_array_equal(first.scan.pixels, load_scan(png, window="auto").pixels)
    # The same bytes uploaded again (another folder, as Gradio keeps each upload): reused.
    (tmp_path / "again").mkdir()
    copy = tmp_path / "again" / png.name
    copy.write_bytes(png.read_bytes())
    assert cache.scan(copy, window="auto") is first.scan
    w.load_windowed(png, w.FILE, None, None, read=cache.scan)
    w.load_windowed(png, w.CUSTOM, 100.0, 50.0, read=cache.scan)
    assert calls == ["auto", None, (100.0, 50.0)]
    assert cache.scan(png, include_phi=True) is not cache.scan(png)  # identifiers: own entry
    arr = np.asarray(Image.open(png)).copy()
    arr[0, 0] ^= 1
    Image.fromarray(arr).save(png)  # new content: decoded again
    assert cache.scan(png, window="auto") is not first.scan and len(calls) == 5


def test_derived_values_are_made_once_even_at_once(png: Path) -> None:
    cache, _ = counting_cache()
    scan = cache.scan(png)
    made: list[int] = []
    barrier = threading.Barrier(4)

    def ask() -> None:
        barrier.wait()
        cache.derived(scan, "predict", lambda: made.append(1) or "answer")

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.derived(scan, "predict", lambda: "other") == "answer"
    assert 1 <= len(made) <= 4  # concurrent first asks may each compute; later ones reuse


def test_bounded_by_bytes(png: Path) -> None:
    cache, calls = counting_cache(max_bytes=3 * (40 * 50 * 4 + 4096))  # three scans
    for c in range(5):
        cache.scan(png, window=(100.0 + c, 50.0))
    cache.scan(png, window=(100.0, 50.0))  # the oldest was dropped: decoded again
    assert len(calls) == 6
    cache.scan(png, window=(104.0, 50.0))  # the newest is kept
    assert len(calls) == 6
