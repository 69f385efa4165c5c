"""Decoded, resized training images on disk, so each scan is decoded once.

Layout under the cache root (one sub-folder per preprocessing configuration)::

    file-digests.json                  path -> (size, mtime_ns, sha256): skips re-hashing
    <S>px-<cfgkey>/entries/ab/<sha256>.npz   one decoded file: uint16 (S, S) + metadata
    <S>px-<cfgkey>/sets/<setkey>.npy         (N, S, S) uint16 of one ordered list of files
    <S>px-<cfgkey>/sets/<setkey>.json        which rows are valid, errors, patient keys

Entries are keyed by the SHA-256 of the file's bytes plus the configuration (input size,
cache format and LungViT version, since a decoder change can change pixels): a renamed or
copied file is a hit, a modified file a miss. What is stored is exactly
``resize_pixels(scan.pixels, cfg.input_size)`` (values in [0, 1]) quantised to uint16,
which keeps the 16-bit precision of DICOM sources; normalisation and augmentation happen
later, per batch. Every file is written to a temporary name and moved into place with
``os.replace``, so two processes may build the same cache at once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
import zipfile
from collections.abc import Callable, MutableMapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lungvit.core import __version__
from lungvit.core.atomic import atomic_open, atomic_path
from lungvit.core.errors import ScanReadError
from lungvit.core.io.ingest import WORKING_SIDE, load_scan
from lungvit.core.model.preprocess import PreprocessConfig, resize_pixels
from lungvit.training.data.discover import Sample, file_sha256

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: large JPEG 2000 DICOMs read at WORKING_SIDE, as predictions read them
SCALE = 65535.0  # uint16 full scale: stored = round(pixels * SCALE)
_KEEP_SETS = 2  # most recently used sets kept per configuration
_RACY_NS = 2_000_000_000  # files modified this recently are re-hashed next time
# Starting decoding processes costs seconds (each imports torch); below this many files to
# decode, decoding in this process is faster.
POOL_MIN_FILES = 256


def default_cache_dir() -> Path:
    """``$LUNGVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lungvit/preprocess`` (~/.cache)."""
    if env := os.environ.get("LUNGVIT_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lungvit" / "preprocess"


@dataclass
class CacheResult:
    """The images of one :meth:`PreprocessCache.build`, row i for sample i.

    Attributes:
        images: (N, S, S) uint16, read-only memmap; ``images / SCALE`` is in [0, 1]. Rows of
            unreadable files are zero.
        ok: (N,) bool, False for unreadable files.
        errors: (sample path, reason) for each unreadable file.
        patient_keys: hashed DICOM PatientID per sample (None for PNG/JPEG or absent).
        hits: files found in the cache (or identical to another file of this build).
        misses: files decoded by this build.
        digests: SHA-256 of each file (None when it could not be read).
        path: the .npy file behind ``images`` (None for an empty build).
    """

    images: np.ndarray
    ok: np.ndarray
    errors: list[tuple[str, str]]
    patient_keys: list[str | None]
    hits: int
    misses: int
    digests: list[str | None]
    path: Path | None = None


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _write_entry(path: Path, pixels: np.ndarray, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        np.savez(f, pixels=pixels, meta=np.array(json.dumps(meta)))


def _read_entry(path: Path) -> tuple[np.ndarray, dict] | None:
    """An entry's (pixels, metadata), or None if it is absent or damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["pixels"], json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _decode(path: str, entry: str, size: int) -> str | None:
    """Decode one file into a cache entry.

    Returns:
        None when an entry was written (the decoded scan, or the reader's verdict that the
        file is unreadable, which is as much a property of its bytes); otherwise the reason
        for a failure that may not recur (the file vanished, an unexpected error), which is
        reported but not cached.
    """
    pixels, key, error = np.zeros((0, 0), np.uint16), None, None
    try:
        scan = load_scan(path, min_side=WORKING_SIDE)  # as predictions read it
        resized = resize_pixels(scan.pixels, size).numpy()  # (S, S) in [0, 1]
        pixels = np.rint(resized * SCALE).astype(np.uint16)
        key = scan.meta.patient_key
    except ScanReadError as exc:
        error = str(exc)
    except OSError as exc:
        return f"could not be read: {exc.strerror or exc}"
    except Exception as exc:  # noqa: BLE001 - one odd file must not end a long build;
        # it is reported with the others (type and message only: never pixel data or PHI).
        log.warning("unexpected %s while decoding a training file", type(exc).__name__)
        return f"unexpected {type(exc).__name__} while decoding: {exc}"
    _write_entry(Path(entry), pixels, {"patient_key": key, "error": error})
    return None


def _init_worker() -> None:
    torch.set_num_threads(1)  # one decode per process; no thread oversubscription


class PreprocessCache:
    """Decoded, resized images on disk (numpy memmap), keyed by file content hash + config.

    Args:
        root: cache folder (created on first build); see :func:`default_cache_dir`.
        cfg: the preprocessing configuration; only ``input_size`` affects what is stored.
    """

    def __init__(self, root: str | Path, cfg: PreprocessConfig) -> None:
        self.root = Path(root).expanduser()
        self.cfg = cfg
        spec = {"format": CACHE_FORMAT, "input_size": int(cfg.input_size), "dtype": "uint16",
                "lungvit": __version__}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = self.root / f"{int(cfg.input_size)}px-{key}"

    def entry_path(self, digest: str) -> Path:
        """Where the decoded form of the file with this SHA-256 is stored."""
        return self.dir / "entries" / digest[:2] / f"{digest}.npz"

    # -- hashing -------------------------------------------------------------------------
    def _hash_all(self, paths: list[str], memo: MutableMapping[str, str], num_workers: int
                  ) -> tuple[list[str | None], dict[int, str]]:
        stat_file = self.root / "file-digests.json"
        try:
            known = json.loads(stat_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
        digests: list[str | None] = [None] * len(paths)
        failed: dict[int, str] = {}
        todo: list[int] = []
        stats: dict[int, os.stat_result] = {}
        for i, p in enumerate(paths):
            try:
                st = stats[i] = os.stat(p)
            except OSError as exc:
                failed[i] = f"could not be read: {exc.strerror or exc}"
                continue
            rec = known.get(p)
            if p in memo:
                digests[i] = memo[p]
            elif rec and rec[0] == st.st_size and rec[1] == st.st_mtime_ns:
                digests[i] = rec[2]
            else:
                todo.append(i)

        def one(i: int) -> str | None:
            try:
                return file_sha256(paths[i])
            except OSError as exc:
                failed[i] = f"could not be read: {exc.strerror or exc}"
                return None

        # hashlib releases the GIL on large buffers, so threads overlap I/O and hashing.
        with ThreadPoolExecutor(max_workers=max(1, min(8, num_workers or 1))) as pool:
            for i, d in zip(todo, pool.map(one, todo)):
                digests[i] = d
        now = time.time_ns()
        changed = bool(todo)
        for i, d in enumerate(digests):
            if d is None:
                continue
            memo[paths[i]] = d
            record = [stats[i].st_size, stats[i].st_mtime_ns, d]
            if now - stats[i].st_mtime_ns > _RACY_NS and known.get(paths[i]) != record:
                known[paths[i]] = record
                changed = True
        if changed:
            _write_json(stat_file, known)
        return digests, failed

    # -- building ------------------------------------------------------------------------
    def build(self, samples: Sequence[Sample], *, num_workers: int = 0,
              progress: Callable[[int, int], None] | None = None,
              digests: MutableMapping[str, str] | None = None) -> CacheResult:
        """Decode what is not cached yet and return all samples' images.

        Args:
            samples: the files, in the order of the result's rows.
            num_workers: decoding processes (0: decode in this process).
            progress: called with (files done, total files) as the build advances.
            digests: optional path -> SHA-256 memo to use and fill (e.g.
                :attr:`DatasetIndex.digests`, so fingerprinting does not hash again).

        Returns:
            The :class:`CacheResult`. Unreadable files are listed in ``errors`` with the
            reader's message and have ``ok`` False; they never stop the build.
        """
        paths = [s.path for s in samples]
        n, size = len(paths), int(self.cfg.input_size)
        hashes, failed = self._hash_all(paths, {} if digests is None else digests, num_workers)
        if n == 0:
            return CacheResult(np.zeros((0, size, size), np.uint16), np.zeros(0, bool), [], [],
                               0, 0, [])
        set_key = hashlib.sha256("\n".join(d or f"!{p}" for d, p in zip(hashes, paths))
                                 .encode("utf-8", "surrogatepass")).hexdigest()[:24]
        set_npy = self.dir / "sets" / f"{set_key}.npy"
        set_json = set_npy.with_suffix(".json")
        meta = self._load_set_meta(set_json, n)
        misses = 0
        if meta is None or not set_npy.exists():
            misses, transient = self._decode_missing(paths, hashes, failed, num_workers, progress)
            meta = self._assemble(hashes, failed, set_npy, set_json, size, remember=not transient)
        os.utime(set_npy)  # "recently used", for the clean-up of old sets
        self._forget_old_sets()
        images = np.load(set_npy, mmap_mode="r")
        if progress is not None:
            progress(n, n)
        errors = [(paths[int(i)], reason) for i, reason in sorted(meta["errors"].items(),
                                                                   key=lambda kv: int(kv[0]))]
        return CacheResult(images=images, ok=np.array(meta["ok"], dtype=bool), errors=errors,
                           patient_keys=list(meta["patient_keys"]), hits=n - misses,
                           misses=misses, digests=hashes, path=set_npy)

    @staticmethod
    def _load_set_meta(path: Path, n: int) -> dict | None:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if meta.get("n") == n else None

    def _decode_missing(self, paths: list[str], hashes: list[str | None], failed: dict[int, str],
                        num_workers: int, progress: Callable[[int, int], None] | None
                        ) -> tuple[int, bool]:
        """Decode each file whose content is not cached yet (once per distinct content).

        Returns:
            (files decoded, whether any failed in a way that may not recur); such failures
            are added to ``failed``.
        """
        todo: dict[str, int] = {}
        for i, d in enumerate(hashes):
            if d is not None and d not in todo and not self.entry_path(d).exists():
                todo[d] = i
        n, done = len(paths), len(paths) - len(todo)
        if progress is not None:
            progress(done, n)
        digests = list(todo)
        args = ([paths[i] for i in todo.values()], [str(self.entry_path(d)) for d in digests],
                [int(self.cfg.input_size)] * len(todo))
        transient: dict[str, str] = {}
        if num_workers > 0 and len(todo) >= POOL_MIN_FILES:
            ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch
            with ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker) as pool:
                results = pool.map(_decode, *args, chunksize=max(1, len(todo) // (num_workers * 8)))
                for d, failure in zip(digests, results):
                    if failure is not None:
                        transient[d] = failure
                    done += 1
                    if progress is not None:
                        progress(done, n)
        else:
            for d, *a in zip(digests, *args):
                if (failure := _decode(*a)) is not None:
                    transient[d] = failure
                done += 1
                if progress is not None:
                    progress(done, n)
        for i, d in enumerate(hashes):
            if d in transient:
                failed[i] = transient[d]
        return len(todo), bool(transient)

    def _assemble(self, hashes: list[str | None], failed: dict[int, str], set_npy: Path,
                  set_json: Path, size: int, *, remember: bool = True) -> dict:
        """Copy the entries of this list of files into one memmap, plus its metadata.

        With ``remember`` False (some failure may not recur) the metadata is not written,
        so the next build assembles the set again instead of reusing it.
        """
        n = len(hashes)
        set_npy.parent.mkdir(parents=True, exist_ok=True)
        meta: dict = {"n": n, "ok": [False] * n, "errors": {}, "patient_keys": [None] * n}
        with atomic_path(set_npy) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(n, size, size))
            for i, d in enumerate(hashes):
                entry = None
                if d is not None and i not in failed:
                    entry = _read_entry(self.entry_path(d))
                if entry is None:
                    meta["errors"][str(i)] = failed.get(i, "could not be read")
                    continue
                pixels, info = entry
                if info.get("error"):
                    meta["errors"][str(i)] = info["error"]
                    continue
                out[i] = pixels
                meta["ok"][i] = True
                meta["patient_keys"][i] = info.get("patient_key")
            out.flush()
            del out
        if remember:
            _write_json(set_json, meta)  # written last: a set without its .json is not used
        return meta

    def _forget_old_sets(self) -> None:
        def last_used(p: Path) -> float:
            try:
                return p.stat().st_mtime
            except OSError:  # removed meanwhile by another process
                return 0.0

        sets = sorted((self.dir / "sets").glob("*.npy"), key=last_used, reverse=True)
        for old in sets[_KEEP_SETS:]:
            for p in (old, old.with_suffix(".json")):
                try:
                    p.unlink(missing_ok=True)
                except OSError:  # in use on a system that forbids deleting open files
                    pass
