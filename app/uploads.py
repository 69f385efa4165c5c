"""Uploaded files and zip archives, unpacked safely (no path traversal, bounded size)."""
from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lungvit.core.errors import LungViTError

SCAN_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima", ".png", ".jpg", ".jpeg", ""})


class UploadError(LungViTError, ValueError):
    """An upload that cannot be used (the message says why)."""


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on what one archive may unpack to.

    Attributes:
        max_files: members extracted at most.
        max_total_bytes: uncompressed bytes in all.
        max_member_bytes: uncompressed bytes of one member.
        max_ratio: largest compression ratio of a member (a zip bomb has thousands).
    """

    max_files: int = 20_000
    max_total_bytes: int = 4 << 30
    max_member_bytes: int = 512 << 20
    max_ratio: float = 200.0


def _safe_member_path(name: str) -> PurePosixPath | None:
    """The member's relative path, or None for names that could escape the target."""
    name = name.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or ":" in path.parts[0]:
        return None
    if any(part in ("..", "") for part in path.parts):
        return None
    if any(part.startswith(".") or part == "__MACOSX" for part in path.parts):
        return None  # hidden files and macOS resource forks are never scans
    return path


def extract_zip(archive: str | os.PathLike[str], target: str | os.PathLike[str], *,
                limits: ZipLimits = ZipLimits()) -> list[Path]:
    """Unpack the regular files of ``archive`` under ``target``.

    Members with absolute paths, ``..`` components, symbolic links or hidden names are
    skipped; the limits are checked against the sizes the archive declares and again
    while writing, so a lying header cannot exceed them.

    Args:
        archive: the zip file.
        target: the folder to unpack into (created).
        limits: size and count bounds.

    Returns:
        The extracted files, in archive order.

    Raises:
        UploadError: not a zip archive, or over a limit.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    name = Path(archive).name
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError(f"'{name}' is not a readable zip archive") from exc
    out: list[Path] = []
    total = 0
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > limits.max_files:
            raise UploadError(f"'{name}' holds {len(members)} files; at most "
                              f"{limits.max_files} are unpacked")
        for member in members:
            rel = _safe_member_path(member.filename)
            if rel is None or stat.S_ISLNK(member.external_attr >> 16):
                continue
            if member.file_size > limits.max_member_bytes or (
                    member.compress_size and member.file_size / member.compress_size
                    > limits.max_ratio and member.file_size > 1 << 20):
                raise UploadError(f"'{name}' holds a file that unpacks to "
                                  f"{member.file_size / 2**20:.0f} MiB; refused")
            dest = target.joinpath(*rel.parts)
            if not dest.resolve().is_relative_to(target.resolve()):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with zf.open(member) as src, open(dest, "wb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    total += len(chunk)
                    if written > limits.max_member_bytes or total > limits.max_total_bytes:
                        dst.close()
                        dest.unlink(missing_ok=True)
                        raise UploadError(f"'{name}' unpacks to more than "
                                          f"{limits.max_total_bytes / 2**30:.0f} GiB; refused")
                    dst.write(chunk)
            out.append(dest)
    return out


def is_zip(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts like a zip archive."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def expand_uploads(paths: Sequence[str | os.PathLike[str]], scratch: Path) -> list[Path]:
    """The scan files of an upload: plain files as they are, zips unpacked into ``scratch``.

    An archive is unpacked once per content (its folder is named by its hash), so
    repeated calls reuse it.

    Args:
        paths: the uploaded files.
        scratch: where archives are unpacked.

    Returns:
        Files to read, in upload order (archive members sorted by path).
    """
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if not is_zip(p):
            files.append(p)
            continue
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        target = scratch / f"zip-{digest}"
        done = target / ".complete"
        if not done.exists():
            extract_zip(p, target)
            done.touch()
        members = sorted(f for f in target.rglob("*") if f.is_file() and f.name != ".complete")
        files.extend(f for f in members if f.suffix.lower() in SCAN_SUFFIXES)
    return files


def display_name(path: Path, scratch: Path) -> str:
    """A short unique name for a file: its path inside its archive, else its name."""
    try:
        rel = path.relative_to(scratch)
        return str(PurePosixPath(*rel.parts[1:]))
    except ValueError:
        return path.name
