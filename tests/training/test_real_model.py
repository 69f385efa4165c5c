"""The bundled default model: trained on real scans, says what it has seen, scores what it says.

The file checks run everywhere. The accuracy check re-reads the model's frozen test split from
``../shared/realdata`` (the real scans it was trained on are not in this repository) and skips,
saying so, where that folder is absent.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

from lungvit.core.model.checkpoint import load_checkpoint, read_checkpoint_info
from lungvit.core.io.ingest import load_scan
from lungvit.core.model.card import model_card
from lungvit.core.predict import Predictor, bundled_model_path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "assets" / "lungvit-real.safetensors"
SPLIT = ROOT / "assets" / "lungvit-real-split.csv"
REALDATA = Path(os.environ.get("LUNGVIT_REALDATA", ROOT.parent / "shared" / "realdata"))


def test_bundled_model_is_the_real_data_model() -> None:
    assert MODEL.is_file(), "assets/lungvit-real.safetensors is missing (see assets/README.md)"
    assert MODEL.stat().st_size <= 25 * 2**20
    if bundled_model_path() is not None:  # the installed copy is the same file
        assert bundled_model_path().read_bytes() == MODEL.read_bytes()


def test_it_says_what_it_has_seen() -> None:
    info = read_checkpoint_info(MODEL)
    prov = info.provenance
    # Every class it answers with has real training images, from named sources.
    assert set(prov.class_sources) == set(info.labels)
    for label in info.labels:
        assert sum(prov.class_sources[label].values()) == prov.class_counts[label] > 0, label
    assert "lung-opacity" not in info.labels  # no usable real images of it (realdata README)
    assert len(prov.citations) >= 3
    text = (info.notes + " " + info.intended_use).lower()
    assert "not a medical device" in text and "research" in text
    card = model_card(info)
    assert "Training images by class and source" in card
    assert "leave one source out" in card and "frozen test split" in card
    assert "Demonstration model" not in card


def _test_rows() -> list[tuple[Path, str]]:
    with open(SPLIT, newline="") as f:
        return [(REALDATA / r["path"], r["label"]) for r in csv.DictReader(f)
                if r["split"] == "test"]


def test_it_scores_its_recorded_test_figures_on_the_real_test_split() -> None:
    if not REALDATA.is_dir():
        pytest.skip(f"the real training scans are not here ({REALDATA}): the bundled model's "
                    "test split cannot be re-scored")
    info = read_checkpoint_info(MODEL)
    recorded = info.metrics["within_source_test"]
    rows = _test_rows()
    assert len(rows) == recorded["n"]
    predictor = Predictor.from_checkpoint(MODEL, batch_size=64)
    labels = list(info.labels)
    hits: dict[str, list[bool]] = {c: [] for c in labels}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for path, label in rows:
            hits[label].append(predictor.predict(load_scan(path)).label == label)
    finally:
        torch.set_num_threads(threads)
    recalls = [sum(h) / len(h) for h in hits.values() if h]
    macro = sum(recalls) / len(recalls)
    assert macro == pytest.approx(recorded["macro_recall"], abs=0.01)


def test_split_file_covers_the_model_classes() -> None:
    model, info = load_checkpoint(MODEL)
    with open(SPLIT, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["label"] for r in rows} == set(info.labels)
    train = sum(r["split"] == "train" for r in rows)
    assert train == sum(info.provenance.class_counts.values())
