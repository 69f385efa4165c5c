"""What a training run on a folder would see, before it starts: classes, counts, the split.

Lists files and splits them (:mod:`~lungvit.training.data.discover`,
:mod:`~lungvit.training.data.splits`); decodes nothing, so the app and the CLI can show it
at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lungvit.training.data.discover import (DEFAULT_EXTENSIONS, MANIFEST_COLUMNS, DatasetError,
                                            DatasetIndex, build_index, check_classes)
from lungvit.training.data.splits import split_index


def preview(data: str | Path | DatasetIndex, *, min_per_class: int = 5, val_frac: float = 0.15,
            test_frac: float = 0.15, seed: int = 0) -> dict[str, Any]:
    """What a training run on ``data`` would see, cheaply (lists files, decodes nothing).

    Args:
        data: a folder of class folders, a CSV manifest, or an index already listed.
        min_per_class: classes with fewer images are left out.
        val_frac, test_frac, seed: the split a run with these settings would make.

    Returns:
        A JSON-ready dict: ``root``, ``classes`` (usable, in model order), ``counts`` (per
        class, too-small ones included), ``total`` (usable samples), ``too_small``,
        ``unreadable`` (count), ``unreadable_examples`` (up to 20 [path, reason] pairs),
        ``with_patient_key`` (samples whose patient is known before any DICOM header is
        read), ``split`` ({class: {"train": n, "val": n, "test": n}}: the split the run
        makes, exact unless DICOM headers name patients that file names do not) and
        ``problem`` (why training could not start, or None). Files that fail to decode are
        only found by the cache build, so they are not counted here.
    """
    problem = None
    index = data if isinstance(data, DatasetIndex) else None
    try:
        if index is None:
            index = build_index(data, min_per_class, DEFAULT_EXTENSIONS, MANIFEST_COLUMNS)
        check_classes(index.classes, index.too_small, str(data), min_per_class)
    except DatasetError as exc:
        problem = str(exc)
    if index is None:  # nothing could be listed (missing folder, no class folders, ...)
        index = DatasetIndex([], [], [], {}, str(data))
    counts = {**index.class_counts(), **index.too_small}
    split: dict[str, dict[str, int]] = {c: {"train": 0, "val": 0, "test": 0} for c in index.classes}
    if index.samples:
        for name, members in split_index(index, val_frac=val_frac, test_frac=test_frac,
                                         seed=seed).items():
            for i in members:
                split[index.samples[i].label][name] += 1
    return {
        "root": index.root,
        "classes": list(index.classes),
        "counts": dict(sorted(counts.items())),
        "total": len(index.samples),
        "too_small": dict(index.too_small),
        "unreadable": len(index.unreadable),
        "unreadable_examples": [list(u) for u in index.unreadable[:20]],
        "with_patient_key": sum(s.patient_key is not None for s in index.samples),
        "split": split,
        "problem": problem,
    }
