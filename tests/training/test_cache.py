"""The preprocessing cache: decode once, key by content and configuration, never crash."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungvit.cli import main as cli
from lungvit.core.io.ingest import load_scan
from lungvit.core.model.preprocess import PreprocessConfig, resize_pixels
from lungvit.training.data import cache as cache_mod
from lungvit.training.data.cache import SCALE, PreprocessCache
from lungvit.training.data.discover import Sample

CFG = PreprocessConfig(input_size=32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo-data", str(root), "--per-class", "6", "--size", "64"]) == 0
    return root


@pytest.fixture
def files(demo: Path, tmp_path: Path) -> list[Path]:
    """Twelve demo scans copied into a private folder (tests may rename or change them)."""
    out = tmp_path / "scans"
    out.mkdir()
    picked = sorted(demo.rglob("*.png"))[::3][:12]  # 8- and 16-bit PNGs
    return [Path(shutil.copy(p, out / p.name)) for p in picked]


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Records every file the cache decodes (in this process)."""
    calls: list[str] = []

    def counting(source, **kw):
        calls.append(str(source))
        return load_scan(source, **kw)

    monkeypatch.setattr(cache_mod, "load_scan", counting)
    return calls


def _samples(paths: list[Path]) -> list[Sample]:
    return [Sample(str(p), "x") for p in paths]


def test_build_stores_the_resized_scan_and_decodes_once(files, tmp_path, decodes) -> None:
    result = PreprocessCache(tmp_path / "cache", CFG).build(_samples(files))
    assert (result.misses, result.hits, len(decodes)) == (12, 0, 12)
    assert result.images.shape == (12, 32, 32) and result.images.dtype == np.uint16
    assert isinstance(result.images, np.memmap) and result.ok.all() and result.errors == []
    for i, p in enumerate(files):
        expected = resize_pixels(load_scan(p).pixels, 32).numpy()
        np.testing.assert_allclose(result.images[i] / SCALE, expected, atol=0.5 / SCALE + 1e-7)

    decodes.clear()
    again = PreprocessCache(tmp_path / "cache", CFG).build(_samples(files))
    assert (again.misses, again.hits, decodes) == (0, 12, [])
    np.testing.assert_array_equal(again.images, result.images)
    # Without the assembled set, the per-file entries still spare every decode.
    shutil.rmtree(tmp_path / "cache" / PreprocessCache(tmp_path / "cache", CFG).dir.name / "sets")
    third = PreprocessCache(tmp_path / "cache", CFG).build(_samples(files[::-1]))
    assert decodes == [] and third.misses == 0
    np.testing.assert_array_equal(third.images, result.images[::-1])


def test_keyed_by_content_not_name(files, tmp_path, decodes) -> None:
    cache = PreprocessCache(tmp_path / "cache", CFG)
    cache.build(_samples(files))
    decodes.clear()
    renamed = files[0].rename(files[0].with_name("renamed.png"))
    assert cache.build(_samples([renamed, *files[1:]])).misses == 0 and decodes == []
    # New content under an old name is decoded again.
    img = np.asarray(Image.open(files[1]))
    Image.fromarray(255 - img).save(files[1])
    result = cache.build(_samples([renamed, *files[1:]]))
    assert result.misses == 1 and decodes == [str(files[1])]
    expected = resize_pixels(load_scan(files[1]).pixels, 32).numpy()
    np.testing.assert_allclose(result.images[1] / SCALE, expected, atol=1e-4)


def test_keyed_by_input_size_only(files, tmp_path, decodes) -> None:
    PreprocessCache(tmp_path / "cache", CFG).build(_samples(files))
    decodes.clear()
    other_norm = PreprocessConfig(input_size=32, mean=0.1, std=0.3)  # applied per batch
    assert PreprocessCache(tmp_path / "cache", other_norm).build(_samples(files)).misses == 0
    small = PreprocessCache(tmp_path / "cache", PreprocessConfig(input_size=16)).build(
        _samples(files))
    assert small.misses == 12 and small.images.shape == (12, 16, 16) and len(decodes) == 12


def test_unreadable_files_are_listed_and_skipped(files, tmp_path, decodes) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    data = files[0].read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    (bad / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    paths = [files[0], bad / "empty.png", bad / "truncated.png", bad / "random.dcm",
             bad / "deleted.png", files[1]]
    result = PreprocessCache(tmp_path / "cache", CFG).build(_samples(paths))
    assert result.ok.tolist() == [True, False, False, False, False, True]
    reasons = dict(result.errors)
    assert set(reasons) == {str(p) for p in paths[1:5]}
    assert "empty" in reasons[str(bad / "empty.png")]
    assert "could not be read" in reasons[str(bad / "deleted.png")]
    assert not result.images[1:5].any()
    # Each message is the reader's own (a ScanReadError), not a traceback.
    for p in paths[2:4]:
        with pytest.raises(Exception) as exc:
            load_scan(p)
        assert reasons[str(p)] == str(exc.value)
    decodes.clear()
    again = PreprocessCache(tmp_path / "cache", CFG).build(_samples(paths))
    assert decodes == [] and again.errors == result.errors  # failures are cached too


def test_identical_files_are_decoded_once(files, tmp_path, decodes) -> None:
    twin = Path(shutil.copy(files[0], tmp_path / "twin.png"))
    result = PreprocessCache(tmp_path / "cache", CFG).build(_samples([files[0], twin]))
    assert len(decodes) == 1 and result.digests[0] == result.digests[1]
    np.testing.assert_array_equal(result.images[0], result.images[1])


def test_concurrent_and_parallel_builds_agree(files, tmp_path) -> None:
    serial = PreprocessCache(tmp_path / "serial", CFG).build(_samples(files))
    results, errors = [], []

    def build() -> None:
        try:
            results.append(PreprocessCache(tmp_path / "shared", CFG).build(_samples(files)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for r in results:
        np.testing.assert_array_equal(r.images, serial.images)
    assert not list((tmp_path / "shared").rglob("*.tmp"))  # no temporary file left behind


@pytest.mark.slow  # starting decoding processes imports torch in each: ~10-20 s
def test_decoding_processes_give_the_same_images(files, tmp_path, monkeypatch) -> None:
    serial = PreprocessCache(tmp_path / "serial", CFG).build(_samples(files))
    monkeypatch.setattr(cache_mod, "POOL_MIN_FILES", 2)
    pooled = PreprocessCache(tmp_path / "pool", CFG).build(_samples(files), num_workers=2)
    assert pooled.misses == 12 and pooled.ok.all()
    # One thread per decoding process changes float summation order: at most 1 LSB apart.
    diff = np.abs(pooled.images.astype(np.int32) - serial.images.astype(np.int32))
    assert diff.max() <= 1


def test_progress_reports_every_file(files, tmp_path) -> None:
    seen: list[tuple[int, int]] = []
    PreprocessCache(tmp_path / "cache", CFG).build(_samples(files),
                                                   progress=lambda d, n: seen.append((d, n)))
    assert seen[0] == (0, 12) and seen[-1] == (12, 12)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_unexpected_failures_are_reported_but_not_cached(files, tmp_path, monkeypatch) -> None:
    def broken(source, **kw):
        if str(source) == str(files[2]):
            raise RuntimeError("decoder bug")
        return load_scan(source, **kw)

    monkeypatch.setattr(cache_mod, "load_scan", broken)
    first = PreprocessCache(tmp_path / "cache", CFG).build(_samples(files))
    assert first.errors == [(str(files[2]), "unexpected RuntimeError while decoding: decoder bug")]
    monkeypatch.setattr(cache_mod, "load_scan", load_scan)
    second = PreprocessCache(tmp_path / "cache", CFG).build(_samples(files))
    assert second.ok.all() and second.misses == 1  # retried, and only that file
