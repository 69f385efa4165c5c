"""Uploaded files and zip archives, unpacked safely (no path traversal, bounded size).

An archive is checked against the sizes it declares before anything is written: per
member, over the whole archive (its compression ratio and its total), and against what
the browser session that sent it has already unpacked (:class:`SessionQuota`; the
``lungvit-app --max-unpacked`` setting, 2 GiB by default).
"""
from __future__ import annotations

import hashlib
import os
import stat
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from lungvit.core.errors import LungViTError

SCAN_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima", ".png", ".jpg", ".jpeg", ""})
DEFAULT_UNPACK_LIMIT = 2 << 30  # bytes one upload, and one browser session, may unpack


class UploadError(LungViTError, ValueError):
    """An upload that cannot be used (the message says why)."""


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on what one archive may unpack to.

    Attributes:
        max_files: members extracted at most.
        max_total_bytes: uncompressed bytes in all.
        max_member_bytes: uncompressed bytes of one member.
        max_ratio: largest compression ratio of a member, and of the whole archive (a zip
            bomb has thousands; scans compress a few times at most).
        ratio_floor_bytes: the ratio is checked only past this many uncompressed bytes (a
            small blank file compresses well and is harmless).
    """

    max_files: int = 20_000
    max_total_bytes: int = DEFAULT_UNPACK_LIMIT
    max_member_bytes: int = 512 << 20
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1 << 20


class SessionQuota:
    """Bytes unpacked from zips per browser session; refuses what would pass the limit.

    Without it a client could fill the disk with many archives that each stay under the
    per-upload limit. Sessions are keyed by Gradio's session hash; the least recently
    seen are forgotten past ``max_sessions``.

    Args:
        limit: bytes one session may unpack in all.
        max_sessions: sessions remembered at most.
    """

    def __init__(self, limit: int = DEFAULT_UNPACK_LIMIT, max_sessions: int = 10_000) -> None:
        self.limit = limit
        self.max_sessions = max_sessions
        self._used: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def used(self, session: str) -> int:
        """Bytes ``session`` has unpacked so far."""
        with self._lock:
            return self._used.get(session, 0)

    def reserve(self, session: str, nbytes: int, name: str) -> None:
        """Count ``nbytes`` against ``session``, or refuse them all.

        Raises:
            UploadError: the session would pass its limit (nothing is counted then).
        """
        with self._lock:
            used = self._used.pop(session, 0)
            self._used[session] = used  # most recently seen last
            if used + nbytes > self.limit:
                raise UploadError(
                    f"'{name}' unpacks to {nbytes / 2**20:.0f} MiB, and this session has "
                    f"already unpacked {used / 2**20:.0f} MiB of at most "
                    f"{self.limit / 2**30:.3g} GiB; refused (reload the page to start a new "
                    "session, or ask the operator to raise --max-unpacked)")
            self._used[session] = used + nbytes
            while len(self._used) > self.max_sessions:
                self._used.popitem(last=False)


# The app's settings, set once at start by ``lungvit-app`` (set_unpack_limit).
SESSION_QUOTA = SessionQuota()
DEFAULT_LIMITS = ZipLimits()


def set_unpack_limit(nbytes: int) -> None:
    """Set how much one upload, and one browser session in all, may unpack (bytes)."""
    global DEFAULT_LIMITS
    SESSION_QUOTA.limit = nbytes
    DEFAULT_LIMITS = replace(DEFAULT_LIMITS, max_total_bytes=nbytes)


def current_session() -> str | None:
    """The Gradio session hash of the event being handled (None outside an event)."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    return getattr(request, "session_hash", None) if request is not None else None


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
                limits: ZipLimits | None = None, quota: SessionQuota | None = None,
                session: str | None = None) -> list[Path]:
    """Unpack the regular files of ``archive`` under ``target``.

    Members with absolute paths, ``..`` components, symbolic links or hidden names are
    skipped. Before anything is written, the sizes the archive declares are checked per
    member, over the whole archive (total and compression ratio) and against the
    session's quota; they are checked again while writing, so a lying header cannot
    exceed them. Files are written 600 in folders 700 (scans are private, whatever the
    umask).

    Args:
        archive: the zip file.
        target: the folder to unpack into (created).
        limits: size and count bounds (default: the app's, see :func:`set_unpack_limit`).
        quota: what each browser session may unpack (default: the app's).
        session: the session to charge (default: the Gradio event's; outside an event,
            none is charged).

    Returns:
        The extracted files, in archive order.

    Raises:
        UploadError: not a zip archive, or over a limit.
    """
    limits = DEFAULT_LIMITS if limits is None else limits
    quota = SESSION_QUOTA if quota is None else quota
    session = session or current_session()
    target = Path(target)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for member in members:
            rel = _safe_member_path(member.filename)
            if rel is None or stat.S_ISLNK(member.external_attr >> 16):
                continue
            if member.file_size > limits.max_member_bytes or (
                    member.file_size > limits.ratio_floor_bytes
                    and member.file_size > limits.max_ratio * max(member.compress_size, 1)):
                raise UploadError(f"'{name}' holds a file that unpacks to "
                                  f"{member.file_size / 2**20:.0f} MiB; refused")
            dest = target.joinpath(*rel.parts)
            if dest.resolve().is_relative_to(target.resolve()):
                plan.append((member, dest))
        _check_archive(name, plan, limits)
        if session is not None:
            quota.reserve(session, sum(m.file_size for m, _ in plan), name)
        made: list[Path] = []  # files and folders this call created, removed on failure
        try:
            for member, dest in plan:
                for folder in reversed(dest.parents):
                    if folder.is_relative_to(target) and not folder.exists():
                        folder.mkdir(mode=0o700)  # scans are private whatever the umask
                        made.append(folder)
                written = 0
                with zf.open(member) as src, open(dest, "wb", opener=_owner_only) as dst:
                    made.append(dest)
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        total += len(chunk)
                        if written > limits.max_member_bytes or total > limits.max_total_bytes:
                            raise UploadError(f"'{name}' unpacks to more than "
                                              f"{limits.max_total_bytes / 2**30:.3g} GiB; "
                                              "refused")
                        dst.write(chunk)
                out.append(dest)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            _remove(made)
            raise UploadError(f"the zip is damaged: '{name}' member "
                              f"'{PurePosixPath(member.filename).name}' cannot be read "
                              f"({exc}); nothing was kept from it") from None
        except BaseException:
            _remove(made)
            raise
    return out


def _owner_only(path: str, flags: int) -> int:
    """``open`` opener creating the file 600 (the umask can only narrow it further)."""
    return os.open(path, flags, 0o600)


def _remove(made: Sequence[Path]) -> None:
    """Delete what an interrupted extraction wrote (files, then folders, newest first)."""
    for path in reversed(made):
        try:
            path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
        except OSError:
            pass  # a folder that holds older files stays


def _check_archive(name: str, plan: Sequence[tuple[zipfile.ZipInfo, Path]],
                   limits: ZipLimits) -> None:
    """Refuse an archive whose declared total, or overall compression ratio, is too high.

    Many small members each pass the per-member checks (a 338 KB zip of 300 members of
    1 MiB of zeros unpacks to 300 MiB), so the whole archive is checked as well.
    """
    declared = sum(m.file_size for m, _ in plan)
    packed = sum(m.compress_size for m, _ in plan)
    if declared > limits.max_total_bytes:
        raise UploadError(f"'{name}' unpacks to {declared / 2**20:.0f} MiB, more than the "
                          f"{limits.max_total_bytes / 2**30:.3g} GiB one upload may; refused")
    if declared > limits.ratio_floor_bytes and declared > limits.max_ratio * max(packed, 1):
        raise UploadError(f"'{name}' unpacks to {declared / 2**20:.0f} MiB from "
                          f"{packed / 2**10:.0f} KiB (compressed {declared / max(packed, 1):.0f}"
                          f" times; scans compress a few times at most); refused")


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
