"""Decoded scans and explanations kept between events: one decode per upload and window.

Showing a scan, predicting it and explaining it are separate Gradio events, and each
used to read and decode the file again (three times for the Auto window). A
:class:`ScanCache` keeps the decoded :class:`~lungvit.core.io.scan.Scan` under the file's
content hash, the window asked for and whether identifiers were copied, so every event
after the first finds it; the same cache keeps each scan's prediction per model and its
last explanations (for the downloads made on request).

The key is the file's *content*, not the session: a client reaches an entry only by
holding the same bytes, which it could decode itself, so sharing cannot leak a scan. The
cache is bounded by the bytes its pixels hold and drops the least recently used entry.
Cached scans are shared: callers must not change their pixels or metadata in place.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungvit.core.io.ingest import WORKING_SIDE, load_scan
from lungvit.core.io.scan import Scan

DEFAULT_MAX_BYTES = 768 << 20  # about 40 decoded 2,400 x 2,000 float32 scans
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ScanKey:
    """What one decoded scan depends on.

    Attributes:
        digest: BLAKE2b of the file's bytes.
        window: the window passed to ``load_scan`` ((center, width), "auto", "minmax" or
            None for the file's own).
        include_phi: identifying attributes were copied into the metadata.
        min_side: the ``min_side`` passed to ``load_scan`` (None: full size).
    """

    digest: str
    window: tuple[float, float] | str | None
    include_phi: bool
    min_side: int | None = WORKING_SIDE


def _size(value: Any) -> int:
    """Bytes an entry holds (its arrays; a small constant for anything else)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], weakref.ref):
        value = value[1]  # a derived entry: (the scan's weak reference, the result)
    if isinstance(value, Scan):
        return int(value.pixels.nbytes) + 4096
    explanations = getattr(value, "explanations", None)
    if isinstance(explanations, dict):  # an ExplanationSet: its maps and overlays
        return 4096 + sum(int(e.map.nbytes + e.overlay.nbytes + e.raw.nbytes)
                          for e in explanations.values())
    return 4096


class ScanCache:
    """Decoded scans, predictions and explanations, least recently used dropped first.

    Args:
        max_bytes: the pixels (and maps) kept at most.
        reader: decodes a file: ``reader(data, name=..., window=..., include_phi=...,
            min_side=...)``
            (default :func:`~lungvit.core.io.ingest.load_scan`); tests count its calls.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES,
                 reader: Callable[..., Scan] = load_scan) -> None:
        self.max_bytes = max_bytes
        self._reader = reader
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._digests: dict[tuple[str, int, int], str] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self.decodes = 0  # files decoded (a miss); for tests and the bench

    def digest(self, path: str | Path) -> str:
        """The content hash of a file, remembered by (path, size, modification time)."""
        p = Path(path)
        st = p.stat()
        stamp = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._digests.get(stamp)
        if known is not None:
            return known
        h = hashlib.blake2b(digest_size=20)
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        value = h.hexdigest()
        with self._lock:
            if len(self._digests) > 4096:
                self._digests.clear()
            self._digests[stamp] = value
        return value

    def scan(self, path: str | Path, *, window: tuple[float, float] | str | None = None,
             include_phi: bool = False, name: str | None = None,
             min_side: int | None = WORKING_SIDE) -> Scan:
        """The scan in ``path`` read with ``window``: decoded on the first call only.

        Args:
            path: the uploaded file.
            window: as :func:`~lungvit.core.io.ingest.load_scan` takes it.
            include_phi: copy identifying attributes into the metadata.
            name: the name reported in the metadata (default the file's).
            min_side: as ``load_scan`` takes it: by default the size that showing and
                predicting use (a large JPEG 2000 DICOM is read smaller); None for the
                full-size image of a download.

        Raises:
            ScanReadError: the file cannot be read (nothing is cached then).
        """
        p = Path(path)
        key = self.scan_key(p, window, include_phi, min_side)
        return self.get_or_make(("scan", key, name or p.name), lambda: self._decode(
            p, window, include_phi, name or p.name, min_side))

    def scan_key(self, path: str | Path, window: tuple[float, float] | str | None,
                 include_phi: bool = False, min_side: int | None = WORKING_SIDE) -> ScanKey:
        """The key :meth:`scan` files a scan under (to key what is derived from it)."""
        return ScanKey(self.digest(path), _window_key(window), bool(include_phi), min_side)

    def _decode(self, path: Path, window: tuple[float, float] | str | None,
                include_phi: bool, name: str, min_side: int | None) -> Scan:
        scan = self._reader(path.read_bytes(), name=name, window=window,
                            include_phi=include_phi, min_side=min_side)
        with self._lock:
            self.decodes += 1
        return scan

    def derived(self, scan: Scan, what: Hashable, make: Callable[[], Any]) -> Any:
        """Something computed from a cached scan (its prediction by a model, its
        explanations), made once while that very scan object is cached.

        Args:
            scan: a scan from :meth:`scan`.
            what: what is derived, e.g. ``("predict", model key)``.
            make: computes it.
        """
        key = ("derived", id(scan), what)
        hit = self.get(key)
        if hit is not None and hit[0]() is scan:  # not a stale entry of a freed scan
            return hit[1]
        value = make()
        self.put(key, (weakref.ref(scan), value))
        return value

    def get(self, key: Hashable) -> Any | None:
        """A cached value, or None."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` under ``key`` (dropping the least recently used past the bound)."""
        size = _size(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The cached value of ``key``, made once even when several events ask at once."""
        value = self.get(key)
        if value is not None:
            return value
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:  # a second event for the same key waits for the first one's result
            value = self.get(key)
            if value is None:
                value = make()
                self.put(key, value)
        with self._lock:
            self._key_locks.pop(key, None)
        return value


def _window_key(window: tuple[float, float] | str | None) -> tuple[float, float] | str | None:
    if window is None or isinstance(window, str):
        return window
    return float(window[0]), float(window[1])
