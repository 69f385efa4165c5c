"""Patient-level stratified splits and the split manifest (pure functions, no files decoded)."""
from __future__ import annotations

import csv
import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lungvit.training.data.discover import DatasetError, DatasetIndex, Sample
from lungvit.training.data.splits import (apply_split_manifest, load_split_manifest,
                                     save_split_manifest, split_indices)


def _dataset(n_patients: int = 60, seed: int = 1) -> tuple[list[str], list[str]]:
    """Labels and patient groups: 3 classes, 1..4 images per patient."""
    rng = random.Random(seed)
    labels, groups = [], []
    for p in range(n_patients):
        label = "abc"[p % 3]
        for _ in range(rng.randint(1, 4)):
            labels.append(label)
            groups.append(f"patient-{p}")
    return labels, groups


def _group_splits(splits: dict[str, list[int]], groups: list) -> dict:
    where = defaultdict(set)
    for name, idx in splits.items():
        for i in idx:
            where[groups[i]].add(name)
    return where


def test_partition_stratified_and_patient_level() -> None:
    labels, groups = _dataset()
    splits = split_indices(labels, groups, val_frac=0.15, test_frac=0.15, seed=0)
    everything = sorted(i for idx in splits.values() for i in idx)
    assert everything == list(range(len(labels)))  # a partition: each sample exactly once
    assert all(len(w) == 1 for w in _group_splits(splits, groups).values())
    for label in "abc":
        n = labels.count(label)
        got = {k: sum(labels[i] == label for i in v) for k, v in splits.items()}
        assert all(got[k] > 0 for k in got), got  # every class in every split
        # Whole patients of 1..4 images: the fractions are close, not exact.
        assert abs(got["test"] - 0.15 * n) <= 4 and abs(got["val"] - 0.15 * n) <= 4, got


def test_deterministic_for_a_seed_and_independent_of_order() -> None:
    labels, groups = _dataset()
    a = split_indices(labels, groups, seed=3)
    assert a == split_indices(labels, groups, seed=3)
    assert a != split_indices(labels, groups, seed=4)
    # Listing the same samples in another order assigns every patient the same split.
    perm = list(range(len(labels)))
    random.Random(0).shuffle(perm)
    b = split_indices([labels[i] for i in perm], [groups[i] for i in perm], seed=3)
    by_group_a = {g: s.pop() for g, s in _group_splits(a, groups).items()}
    by_group_b = {g: s.pop() for g, s in _group_splits(b, [groups[i] for i in perm]).items()}
    assert by_group_a == by_group_b


def test_none_groups_are_single_samples_and_small_classes_fill_train() -> None:
    labels = ["a"] * 20 + ["b"] * 2
    splits = split_indices(labels, [None] * 22, val_frac=0.2, test_frac=0.2, seed=0)
    assert {k: sum(labels[i] == "a" for i in v) for k, v in splits.items()} == \
        {"train": 12, "val": 4, "test": 4}
    # Two samples cannot reach three splits: they stay in train.
    assert sum(labels[i] == "b" for i in splits["train"]) == 2


def test_three_groups_reach_every_split_without_emptying_train() -> None:
    labels = ["a"] * 6
    groups = ["p1", "p1", "p1", "p1", "p2", "p3"]  # one big patient, two small ones
    splits = split_indices(labels, groups, seed=0)
    assert all(splits.values())
    assert splits["train"] == [0, 1, 2, 3]  # the small patients are the held-out ones


def test_invalid_fractions_rejected() -> None:
    with pytest.raises(ValueError):
        split_indices(["a"], [None], val_frac=0.6, test_frac=0.5)
    with pytest.raises(ValueError):
        split_indices(["a", "b"], [None])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("xyz"), st.one_of(st.none(), st.integers(0, 12))),
                min_size=1, max_size=80),
       st.integers(0, 2**16))
def test_never_splits_a_patient(rows: list, seed: int) -> None:
    labels = [r[0] for r in rows]
    groups = [r[1] for r in rows]
    splits = split_indices(labels, groups, seed=seed)
    assert sorted(i for v in splits.values() for i in v) == list(range(len(rows)))
    named = {g: w for g, w in _group_splits(splits, groups).items() if g is not None}
    assert all(len(w) == 1 for w in named.values())


def _index(tmp_path, n: int = 12) -> DatasetIndex:
    samples = [Sample(str(tmp_path / ("ab"[i % 2]) / f"f{i:02d}.png"), "ab"[i % 2], f"key{i // 2}")
               for i in range(n)]
    return DatasetIndex(samples, ["a", "b"], [], {}, str(tmp_path))


def test_manifest_round_trip_has_no_patient_keys(tmp_path) -> None:
    index = _index(tmp_path)
    splits = split_indices([s.label for s in index.samples],
                           [s.patient_key for s in index.samples], seed=0)
    out = save_split_manifest(tmp_path / "runs" / "split.csv", index, splits)
    text = out.read_text()
    assert "key" not in text  # patient keys are not written
    rows = list(csv.DictReader(text.splitlines()))
    assert set(rows[0]) == {"path", "label", "split"}
    assert [r["path"] for r in rows] == ([f"a/f{i:02d}.png" for i in range(0, 12, 2)]
                                         + [f"b/f{i:02d}.png" for i in range(1, 12, 2)])
    loaded = load_split_manifest(out)
    assert {k: sorted(v) for k, v in loaded.items()} == {
        k: sorted(index.relpath(index.samples[i].path) for i in v) for k, v in splits.items()}


def test_bad_manifest_rejected(tmp_path) -> None:
    bad = tmp_path / "s.csv"
    bad.write_text("file,split\na.png,train\n")
    with pytest.raises(DatasetError, match="path and split"):
        load_split_manifest(bad)
    bad.write_text("path,split\na.png,holdout\n")
    with pytest.raises(DatasetError, match="unknown split"):
        load_split_manifest(bad)


def test_reusing_a_manifest_freezes_test_and_routes_new_files() -> None:
    saved = {"train": ["a/1.png", "a/2.png"], "val": ["a/3.png"], "test": ["b/4.png", "b/5.png"]}
    paths = ["a/1.png", "a/3.png", "b/4.png", "b/5.png",  # a/2.png was deleted
             "new/6.png", "new/7.png", "new/8.png", "new/9.png"]
    groups = ["p1", "p3", "p4", None, None, "p4", "p3", "p1"]
    splits, left_out = apply_split_manifest(paths, groups, saved)
    named = {k: [paths[i] for i in v] for k, v in splits.items()}
    assert named["test"] == ["b/4.png", "b/5.png"]  # exactly as saved
    assert named["val"] == ["a/3.png", "new/8.png"]  # joins its patient
    assert named["train"] == ["a/1.png", "new/6.png", "new/9.png"]  # new patient -> train
    assert [paths[i] for i in left_out] == ["new/7.png"]  # a test patient's new file
