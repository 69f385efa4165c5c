"""Finding the labelled scans of a training set: folders of class folders or a CSV manifest.

:func:`discover` only lists files (and reads a manifest); nothing is decoded here. Decoding
happens once, in :class:`lungvit.training.data.cache.PreprocessCache`, which also reports the
files that turn out to be unreadable and the DICOM patient keys.

Patient keys (for patient-level splits) come from, in order of precedence:

1. the manifest's patient column;
2. the file name, when it follows the OCT2017 pattern ``CLASS-PATIENT-N.ext``
   (see :data:`PATIENT_FROM_NAME`), e.g. ``CNV-1016042-1.jpeg`` -> ``1016042`` or
   ``lung-oct-cnv-P0003-2.png`` -> ``P0003``;
3. for DICOM files, the hashed PatientID that :func:`lungvit.core.io.ingest.load_scan`
   reports (filled in by the data module after caching).

Kermany chest X-ray names (``person1000_virus_1681``: patient ``person1000``) are read too.

The *source* of a sample (the hospital, repository or device it came from, for stratified
splits and leave-one-source-out evaluation) comes from the manifest's ``source`` column, else
from a file name of the form ``SOURCE__name.ext`` (two underscores, as in
``../shared/realdata``: ``meddef1__person1000_virus_1681.png`` has source ``meddef1``), else
it is unknown (None). The source prefix is stripped before the patient patterns are matched.

Every key is stored only as :func:`lungvit.core.io.phi.patient_key` (an HMAC under the installation's secret), so a raw
identifier from a manifest is never kept in memory objects that might be logged, and a
manifest that lists DICOM PatientIDs yields the same keys as the files themselves.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lungvit.core.errors import LungViTError
from lungvit.core.io.phi import patient_key as hash_patient_id

# "" stands for files without an extension (DICOM archives often have none, or are named
# by their SOP Instance UID, whose last dotted part is all digits and is treated the same).
DEFAULT_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", "")
MANIFEST_COLUMNS: tuple[str, str, str] = ("path", "label", "patient_id")
SOURCE_COLUMN = "source"
SOURCE_SEPARATOR = "__"

# OCT2017-style names: CLASS-PATIENT-N with N all digits and PATIENT one hyphen-free token
# holding at least one digit (so "lung-normal-17.png" is *not* read as patient "normal").
# The class prefix may itself contain hyphens ("lung-oct-cnv-P0003-2").
PATIENT_FROM_NAME = re.compile(
    r"^(?P<prefix>.+)-(?P<patient>[A-Za-z_]*\d[A-Za-z0-9_]*)-(?P<n>\d+)$")
# Kermany 2018 chest X-ray names: person<N>_<bacteria|virus>_<M>; the patient is person<N>.
KERMANY_CHEST_NAME = re.compile(r"^(?P<patient>person\d+)_(?:bacteria|virus)_\d+$", re.I)
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Files that are never scans even though their name has no extension.
_NEVER_SCANS = frozenset({"DICOMDIR"})
_CHUNK = 1 << 20


class DatasetError(LungViTError, ValueError):
    """A training data set cannot be used as given (the message says why and what to do)."""


@dataclass(frozen=True)
class Sample:
    """One labelled scan.

    Attributes:
        path: absolute path of the file.
        label: class name.
        patient_key: one-way patient key (see the module docstring), or None if unknown.
        source: where the scan came from (see the module docstring), or None if unknown.
    """

    path: str
    label: str
    patient_key: str | None = None
    source: str | None = None


@dataclass
class DatasetIndex:
    """The labelled files of a data set, before decoding.

    Attributes:
        samples: usable samples, sorted by path relative to ``root``.
        classes: class names, sorted (folder order), without too-small classes.
        unreadable: (path relative to root, reason) for files that cannot be used.
        too_small: classes with fewer than ``min_per_class`` samples -> their count; their
            samples are left out of ``samples``.
        root: the data folder (the manifest's folder for a CSV manifest).
        digests: memo of file SHA-256 by absolute path (filled by :meth:`fingerprint` and
            shared with the preprocessing cache so files are hashed once).
    """

    samples: list[Sample]
    classes: list[str]
    unreadable: list[tuple[str, str]]
    too_small: dict[str, int]
    root: str
    digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def relpath(self, path: str) -> str:
        """``path`` relative to the root, with forward slashes (stable across systems)."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def source_counts(self) -> dict[str, dict[str, int]]:
        """Samples per class and source (see :func:`count_sources`)."""
        return count_sources(self.samples, self.classes)

    def class_counts(self) -> dict[str, int]:
        """Samples per class, in class order."""
        counts = Counter(s.label for s in self.samples)
        return {c: counts.get(c, 0) for c in self.classes}

    def fingerprint(self) -> str:
        """SHA-256 over the sorted (relative path, label, file content hash) of every sample.

        The same files under the same relative paths give the same fingerprint on any
        machine and under any root folder.
        """
        rows = []
        for s in self.samples:
            digest = self.digests.get(s.path)
            if digest is None:
                digest = self.digests[s.path] = file_sha256(s.path)
            rows.append(f"{self.relpath(s.path)}\t{s.label}\t{digest}\n")
        h = hashlib.sha256()
        for row in sorted(rows):
            h.update(row.encode("utf-8", "surrogatepass"))
        return h.hexdigest()


def count_sources(samples: Sequence[Sample], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """{class: {source: n}} over ``samples``, in class order; unknown sources as "unknown"."""
    counts = Counter((s.label, s.source or "unknown") for s in samples)
    return {c: {src: n for (lab, src), n in sorted(counts.items()) if lab == c}
            for c in classes}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def source_from_name(path: str) -> str | None:
    """The source prefix of a ``SOURCE__name.ext`` file name, or None."""
    head, sep, rest = os.path.basename(path).partition(SOURCE_SEPARATOR)
    return head if sep and rest and _SOURCE_NAME.match(head) else None


def patient_from_name(path: str) -> str | None:
    """The raw patient token of an OCT2017-style or Kermany chest file name, or None.

    A ``SOURCE__`` prefix is ignored (see :func:`source_from_name`).
    """
    stem = os.path.basename(path)
    if source_from_name(stem) is not None:
        stem = stem.partition(SOURCE_SEPARATOR)[2]
    suffix = _suffix(stem)
    if suffix:
        stem = stem[: -len(suffix)]
    m = PATIENT_FROM_NAME.match(stem) or KERMANY_CHEST_NAME.match(stem)
    return m.group("patient") if m else None


def _suffix(name: str) -> str:
    """Lower-case extension, "" when there is none or it is all digits (UID-named DICOM)."""
    ext = os.path.splitext(name)[1].lower()
    return "" if ext[1:].isdigit() else ext


def _wanted(name: str, extensions: frozenset[str]) -> bool:
    return not name.startswith(".") and name not in _NEVER_SCANS and _suffix(name) in extensions


def _scan_folders(root: Path, extensions: frozenset[str]) -> list[Sample]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(
            f"{root} has no class folders: put each class's scans in its own sub-folder "
            f"({root}/<class>/<scan files>), or give a CSV manifest with path,label columns.")
    samples = []
    for cdir in class_dirs:
        for dirpath, dirnames, filenames in os.walk(cdir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if _wanted(name, extensions):
                    path = os.path.abspath(os.path.join(dirpath, name))
                    raw = patient_from_name(name)
                    samples.append(Sample(path, cdir.name, hash_patient_id(raw),
                                          source_from_name(name)))
    return samples


def _scan_manifest(csv_path: Path, columns: Sequence[str]
                   ) -> tuple[list[Sample], list[tuple[str, str]]]:
    path_col, label_col, patient_col = columns
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in (path_col, label_col) if c not in header]
        if missing:
            raise DatasetError(
                f"manifest {csv_path.name} lacks the column(s) {', '.join(missing)}; it has "
                f"{', '.join(header) or 'no header'}. Expected a header with "
                f"{path_col},{label_col}[,{patient_col}].")
        # Surplus cells of a ragged row land under the key None: they are ignored.
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                for row in reader]
    samples: dict[str, Sample] = {}
    conflicted: set[str] = set()
    unreadable: list[tuple[str, str]] = []
    for line, row in enumerate(rows, start=2):
        given, label = row.get(path_col, ""), row.get(label_col, "")
        if not given:
            unreadable.append((f"{csv_path.name}:{line}", "row has no path"))
            continue
        path = os.path.abspath(os.path.join(root, given))
        if not label:
            unreadable.append((given, "row has no label"))
        elif not os.path.isfile(path):
            unreadable.append((given, "file not found"))
        elif path in conflicted:
            continue
        elif path in samples and samples[path].label != label:
            unreadable.append((given, f"listed twice, as {samples[path].label!r} and {label!r}"))
            samples.pop(path)
            conflicted.add(path)
        elif path not in samples:
            raw = row.get(patient_col) or patient_from_name(path)
            source = row.get(SOURCE_COLUMN) or source_from_name(path)
            samples[path] = Sample(path, label, hash_patient_id(raw), source)
    return list(samples.values()), unreadable


def _drop_small(samples: list[Sample], min_per_class: int
                ) -> tuple[list[Sample], list[str], dict[str, int]]:
    counts = Counter(s.label for s in samples)
    too_small = {c: n for c, n in sorted(counts.items()) if n < min_per_class}
    kept = [s for s in samples if s.label not in too_small]
    return kept, sorted(set(counts) - set(too_small)), too_small


def check_classes(classes: Sequence[str], too_small: dict[str, int], where: str,
                  min_per_class: int) -> None:
    """Raise :class:`DatasetError` unless at least two classes are usable."""
    if len(classes) >= 2:
        return
    if too_small:
        small = ", ".join(f"{c} ({n})" for c, n in too_small.items())
        raise DatasetError(
            f"{where}: fewer than two classes have at least {min_per_class} readable scans "
            f"(too small: {small}; usable: {', '.join(classes) or 'none'}). Add scans or "
            f"lower the minimum per class.")
    if not classes:
        raise DatasetError(f"{where} holds no readable scans (looked for "
                           f"{', '.join(e or 'no extension' for e in DEFAULT_EXTENSIONS)}).")
    raise DatasetError(f"{where} has a single class ({classes[0]}): a classifier needs at "
                       f"least two class folders.")


def build_index(source: str | Path, min_per_class: int, extensions: Sequence[str],
                 manifest_columns: Sequence[str]) -> DatasetIndex:
    src = Path(source).expanduser()
    if not src.exists():
        raise DatasetError(f"{src} does not exist.")
    exts = frozenset(e.lower() for e in extensions)
    if src.is_dir():
        root = src.resolve()
        samples, unreadable = _scan_folders(root, exts), []
    elif src.suffix.lower() == ".csv":
        root = src.resolve().parent
        samples, unreadable = _scan_manifest(src.resolve(), manifest_columns)
    else:
        raise DatasetError(f"{src} is neither a folder of class folders nor a .csv manifest.")
    samples, classes, too_small = _drop_small(samples, min_per_class)
    index = DatasetIndex(samples=samples, classes=classes, unreadable=sorted(unreadable),
                         too_small=too_small, root=str(root))
    index.samples.sort(key=lambda s: index.relpath(s.path))
    return index


def discover(source: str | Path, *, min_per_class: int = 5,
             extensions: Sequence[str] = DEFAULT_EXTENSIONS,
             manifest_columns: Sequence[str] = MANIFEST_COLUMNS) -> DatasetIndex:
    """List the labelled scans of a data set without decoding them.

    Args:
        source: a folder of class folders (``source/<class>/**/<scan>``; hidden files and
            folders, and files at the top level such as ``manifest.csv``, are ignored), or a
            CSV manifest with a header naming ``manifest_columns`` (paths relative to the
            CSV's folder; the patient column is optional).
        min_per_class: classes with fewer samples are left out and listed in ``too_small``.
        extensions: file extensions to consider, lower-case with the dot; "" for none.
        manifest_columns: names of the (path, label, patient id) columns.

    Returns:
        The :class:`DatasetIndex`; manifest rows whose file is missing are in ``unreadable``.

    Raises:
        DatasetError: the source does not exist, has no class folders, no scans, a single
            usable class, or a manifest lacks the path or label column.
    """
    index = build_index(source, min_per_class, extensions, manifest_columns)
    check_classes(index.classes, index.too_small, str(source), min_per_class)
    return index
