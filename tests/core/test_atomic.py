"""Atomic writes: content, owner-only mode, fsync, and nothing changed or left on an error."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lungvit.core import atomic
from lungvit.core.atomic import atomic_open, atomic_path


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the usual umask, which would make a plain new file 644
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_bytes_and_text_land_whole_and_owner_only(tmp_path: Path, umask_022: None) -> None:
    with atomic_open(tmp_path / "a.bin") as f:
        f.write(b"\x00\x01abc")
    with atomic_open(tmp_path / "b.csv", "w", encoding="utf-8", newline="") as f:
        f.write("x,é\r\ny\n")  # newline="" writes line endings as given
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01abc"
    assert (tmp_path / "b.csv").read_bytes() == "x,é\r\ny\n".encode()
    assert _mode(tmp_path / "a.bin") == 0o600 and _mode(tmp_path / "b.csv") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.csv"]


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "t.json"
    target.write_text("old")
    with atomic_open(target, "w", encoding="utf-8") as f:
        f.write("new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["t.json"]


def test_an_error_in_the_block_leaves_the_target_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w", encoding="utf-8") as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["t.txt"]
    with pytest.raises(KeyboardInterrupt):  # BaseException too
        with atomic_path(target):
            raise KeyboardInterrupt
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "x").write_text("kept")  # a non-empty folder: os.replace refuses
    with pytest.raises(OSError):
        with atomic_open(target) as f:
            f.write(b"data")
    assert (target / "x").read_text() == "kept"
    assert os.listdir(tmp_path) == ["d"]


def test_bad_mode_or_encoding_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "t", "ab"):
            pass
    with pytest.raises(LookupError):
        with atomic_open(tmp_path / "t", "w", encoding="no-such-codec"):
            pass
    assert os.listdir(tmp_path) == []


def test_missing_folder_raises_and_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with atomic_open(tmp_path / "missing" / "t"):
            pass
    assert not (tmp_path / "missing").exists()


def test_fsync_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with atomic_open(tmp_path / "a", "wb") as f:
        f.write(b"1")
    assert synced == []
    with atomic_open(tmp_path / "b", "wb", fsync=True) as f:
        f.write(b"1")
    assert synced == ["file"]
    synced.clear()
    with atomic_open(tmp_path / "c", "wb", fsync=True, fsync_dir=True) as f:
        f.write(b"1")
    assert synced == ["file", "dir"]


def test_no_overwrite_keeps_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    with atomic_open(target, "w", encoding="ascii", overwrite=False) as f:
        f.write("first")
    with atomic_open(target, "w", encoding="ascii", overwrite=False) as f:
        f.write("second")
    assert target.read_text() == "first" and _mode(target) == 0o600
    assert os.listdir(tmp_path) == ["secret"]


def test_no_overwrite_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src: object, dst: object) -> None:
        raise PermissionError("this file system has no hard links")

    monkeypatch.setattr(atomic.os, "link", no_link)
    target = tmp_path / "secret"
    with atomic_open(target, "w", encoding="ascii", overwrite=False) as f:
        f.write("first")
    with atomic_open(target, "w", encoding="ascii", overwrite=False) as f:
        f.write("second")
    assert target.read_text() == "first"
    assert os.listdir(tmp_path) == ["secret"]


def test_atomic_path_for_writers_that_want_a_name(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "set.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".set.npy.") and tmp.suffix == ".tmp"
        assert _mode(tmp) == 0o600 and tmp.stat().st_size == 0
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(2, 3))
        out[:] = 7
        out.flush()
        del out
        assert not target.exists()  # nothing at the destination until the block ends
    np.testing.assert_array_equal(np.load(target), np.full((2, 3), 7, np.uint16))
    assert _mode(target) == 0o600 and os.listdir(tmp_path) == ["set.npy"]
