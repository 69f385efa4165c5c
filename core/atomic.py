"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The data goes to a temporary file beside the destination (``.NAME.XXXXXXXX.tmp``, created
600 by :func:`tempfile.mkstemp`, whatever the umask, so what LungViT writes this way is its
owner's only), which is then renamed over it (``os.replace``, atomic within a folder), or
linked to it when an existing file must win. On an error the temporary file is removed and
the destination left as it was. Folders are not created here.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None,
                newline: str | None = None, fsync: bool = False, fsync_dir: bool = False,
                overwrite: bool = True) -> Iterator[IO[Any]]:
    """Write ``path`` atomically through a file object; it takes its place when the block ends.

    Args:
        path: the destination; its folder must exist.
        mode: "wb" or "w" (text, with ``encoding`` and ``newline`` as for :func:`open`).
        fsync: flush the data to disk before the rename (survives a crash).
        fsync_dir: flush the folder after the rename, so the rename itself survives too.
        overwrite: False keeps a destination that exists (another process's, say): the new
            file is linked into place only where there is none.

    Yields:
        The open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    with _staged(Path(path), overwrite=overwrite, fsync_dir=fsync_dir) as (fd, _):
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:  # closes fd on error
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync_dir: bool = False,
                overwrite: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` that takes its place when the block ends.

    For writers that want a file name rather than a file object (``numpy.lib.format.
    open_memmap``); they must close what they opened before the block ends. Arguments as
    for :func:`atomic_open`.

    Yields:
        The temporary file (empty, mode 600).
    """
    with _staged(Path(path), overwrite=overwrite, fsync_dir=fsync_dir) as (fd, tmp):
        os.close(fd)
        yield tmp


@contextmanager
def _staged(path: Path, *, overwrite: bool, fsync_dir: bool) -> Iterator[tuple[int, Path]]:
    """(open descriptor, name) of a new temporary file beside ``path``, moved to ``path``
    when the block ends without an exception and removed in every other case."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    renamed = False
    try:
        yield fd, tmp
        if overwrite:
            os.replace(tmp, path)
            renamed = True
        else:
            _link_unless_exists(tmp, path)
    finally:
        if not renamed:  # an error, or a link (or nothing) made instead of the rename
            tmp.unlink(missing_ok=True)
    if fsync_dir and hasattr(os, "O_DIRECTORY"):  # POSIX
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _link_unless_exists(tmp: Path, path: Path) -> None:
    """Give ``tmp``'s file the name ``path`` unless that name exists (never replaces it)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not path.exists():
            os.replace(tmp, path)
