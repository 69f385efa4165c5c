"""Files at rest readable by their owner only: scans, stores, run folders, secrets.

Patient scans, the tracking store and checkpoints are as private as the scans they were
made from, whatever the user's umask (022, the usual one, makes every new file readable
by every local user). LungViT's entry points (``lungvit``, ``lungvit-app``, and the job
processes they start, which inherit it) run under :func:`owner_only_files`, so everything
they create is 600 (files) or 700 (folders); :func:`tighten` closes what an older version
left open.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

PRIVATE_BITS = 0o077  # group and others: no access


@contextmanager
def owner_only_files() -> Iterator[None]:
    """Create files 600 and folders 700 inside this block (the process's umask gains
    ``077``; stricter bits the user set stay), restoring the umask after it."""
    old = os.umask(PRIVATE_BITS)
    os.umask(old | PRIVATE_BITS)
    try:
        yield
    finally:
        os.umask(old)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder of its owner only (created 700 with its missing parents, or
    closed to group and others if it is this user's and open to them)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    tighten([path])
    return path


def tighten(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Remove group and other access from those of ``paths`` that exist and are this
    user's (folders are not walked); others' files and what cannot be changed are left.

    Returns:
        The paths whose mode was changed.
    """
    changed = []
    for p in map(Path, paths):
        try:
            st = p.lstat()
            if (stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid()
                    or not st.st_mode & PRIVATE_BITS):
                continue
            os.chmod(p, stat.S_IMODE(st.st_mode) & ~PRIVATE_BITS)
            changed.append(p)
        except OSError:
            continue
    return changed
