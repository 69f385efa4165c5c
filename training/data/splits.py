"""Patient-level, stratified train/val/test splits, and the split manifest that freezes them.

A split is decided once per (data, seed) and is reproducible: groups (patients) are ordered
by a seeded hash of their key, not by the order files were listed, so the same files give
the same split on any machine. :func:`save_split_manifest` writes it down (relative path,
label, split: no patient keys), and :func:`apply_split_manifest` reuses it when data are
added later: saved files keep their split, so the test set stays exactly as it was.
"""
from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lungvit.core.atomic import atomic_open
from lungvit.training.data.discover import DatasetError

if TYPE_CHECKING:
    from lungvit.training.data.discover import DatasetIndex

SPLITS: tuple[str, str, str] = ("train", "val", "test")


def _order_key(seed: int, key: Hashable) -> str:
    return hashlib.sha256(f"{seed}\x00{key!r}".encode("utf-8", "surrogatepass")).hexdigest()


def _allocate(sizes: list[int], val_frac: float, test_frac: float) -> list[str]:
    """Assign the groups (patients) of one class, given in random order, to splits.

    With three or more groups, test and val first get the smallest group each (so tiny
    classes are represented without emptying train); then groups, in order, go to test
    or val while that brings their sample count closer to the target fraction. Train
    always keeps at least one group.
    """
    k, total = len(sizes), sum(sizes)
    dest = ["train"] * k
    if k >= 3:
        smallest = sorted(range(k), key=lambda j: (sizes[j], j))
        wanted = [s for s, frac in (("test", test_frac), ("val", val_frac)) if frac > 0]
        for split, j in zip(wanted, smallest):
            dest[j] = split
    count = {s: sum(n for n, d in zip(sizes, dest) if d == s) for s in ("test", "val")}
    target = {"test": test_frac * total, "val": val_frac * total}
    in_train = dest.count("train")
    for j, size in enumerate(sizes):
        if dest[j] != "train" or in_train <= 1:
            continue
        for split in ("test", "val"):
            if count[split] + size / 2 < target[split]:
                dest[j], in_train = split, in_train - 1
                count[split] += size
                break
    return dest


def split_indices(labels: Sequence[str], groups: Sequence[Hashable | None], *,
                  val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0
                  ) -> dict[str, list[int]]:
    """Split samples into train/val/test, stratified by label and grouped by patient.

    Args:
        labels: class of each sample.
        groups: patient key of each sample; samples sharing a key always land in the same
            split; a None key makes the sample its own group.
        val_frac, test_frac: target fractions of each class's samples.
        seed: the same seed and inputs always give the same split.

    Returns:
        {"train": [...], "val": [...], "test": [...]}: sorted sample indices. A group whose
        samples have several labels is placed with the stratum of its most common label.
        Every class with at least three groups is present in every split (for non-zero
        fractions); classes with fewer groups fill train first.
    """
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac ({val_frac}) and test_frac ({test_frac}) must be >= 0 "
                         f"and sum to less than 1")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[("\x00sample", i) if g is None else g].append(i)
    by_label: dict[str, list[Hashable]] = defaultdict(list)
    for key, idx in members.items():
        counts = Counter(labels[i] for i in idx)
        primary = min(counts, key=lambda c: (-counts[c], c))
        by_label[primary].append(key)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        keys = sorted(by_label[label], key=lambda k: _order_key(seed, k))
        dests = _allocate([len(members[k]) for k in keys], val_frac, test_frac)
        for key, dest in zip(keys, dests):
            out[dest].extend(members[key])
    return {s: sorted(v) for s, v in out.items()}


def split_index(index: DatasetIndex, *, val_frac: float = 0.15, test_frac: float = 0.15,
                seed: int = 0) -> dict[str, list[int]]:
    """:func:`split_indices` over a dataset index, grouped by patient, stratified by class and source.

    A sample without a patient key is its own group, named by its relative path, so the
    split of a file does not depend on which other files exist.

    Args:
        index: the listed dataset.
        val_frac, test_frac, seed: as for :func:`split_indices`.

    Returns:
        {"train": [...], "val": [...], "test": [...]}: sorted indices into ``index.samples``.
    """
    groups: list[Hashable] = [s.patient_key if s.patient_key is not None
                              else ("file", index.relpath(s.path)) for s in index.samples]
    # Stratify by class *and* source where sources are known, so each source of a class is
    # represented in validation and test (a class's adult and child normals, say).
    strata = [s.label if s.source is None else f"{s.label}\x00{s.source}"
              for s in index.samples]
    return split_indices(strata, groups, val_frac=val_frac, test_frac=test_frac, seed=seed)


def apply_split_manifest(paths: Sequence[str], groups: Sequence[Hashable | None],
                         saved: dict[str, list[str]]) -> tuple[dict[str, list[int]], list[int]]:
    """Reuse a saved split for the current samples.

    Args:
        paths: relative path of each current sample (as in the manifest).
        groups: patient key of each sample (None: unknown).
        saved: :func:`load_split_manifest`'s result.

    Returns:
        (splits, left_out). Saved files keep their split. A new file joins the split that
        already holds its patient, except test, which stays exactly as saved: new files of
        a test patient are left out (so they can neither change the test set nor leak it
        into training). New files of new patients go to train. Saved files that no longer
        exist are simply absent.
    """
    where = {p: s for s in SPLITS for p in saved.get(s, [])}
    group_split: dict[Hashable, str] = {}
    for i, p in enumerate(paths):
        split = where.get(p)
        if split is not None and groups[i] is not None:
            # A patient spread over splits by an older manifest counts as its strictest one.
            old = group_split.get(groups[i])
            if old is None or SPLITS.index(split) > SPLITS.index(old):
                group_split[groups[i]] = split
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    left_out = []
    for i, p in enumerate(paths):
        split = where.get(p) or group_split.get(groups[i], "train")
        if p not in where and split == "test":
            left_out.append(i)
        else:
            out[split].append(i)
    return out, left_out


def save_split_manifest(path: str | Path, index: DatasetIndex,
                        splits: dict[str, list[int]]) -> Path:
    """Write a split as CSV (path relative to the data root, label, split); no patient keys.

    Args:
        path: CSV file to write (atomically).
        index: the samples the split's indices refer to.
        splits: {"train"/"val"/"test": sample indices}.

    Returns:
        The path written.
    """
    rows = [(index.relpath(index.samples[i].path), index.samples[i].label, split)
            for split in SPLITS for i in splits.get(split, [])]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("path", "label", "split"))
        writer.writerows(sorted(rows))
    return out


def load_split_manifest(path: str | Path) -> dict[str, list[str]]:
    """Read a split manifest written by :func:`save_split_manifest`.

    Returns:
        {"train": [...], "val": [...], "test": [...]}: relative paths.

    Raises:
        DatasetError: the file lacks the path/split columns or names an unknown split.
    """
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"path", "split"} <= set(reader.fieldnames or []):
            raise DatasetError(f"split manifest {path} needs path and split columns; it has "
                               f"{', '.join(reader.fieldnames or []) or 'no header'}.")
        for line, row in enumerate(reader, start=2):
            split = (row["split"] or "").strip()
            if split not in out:
                raise DatasetError(f"split manifest {path}, line {line}: unknown split "
                                   f"{split!r} (expected train, val or test).")
            out[split].append(row["path"])
    return out
