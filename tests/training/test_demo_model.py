"""The phantom demo model: labelled as a demo, and as accurate as it says on new phantoms."""
from __future__ import annotations

from pathlib import Path

import pytest

from lungvit.core.model.checkpoint import load_checkpoint, read_checkpoint_info
from lungvit.cli.main import main as cli_main
from lungvit.synthetic.phantoms import CLASS_NAMES
from lungvit.core.predict import Predictor, demo_model_path

DEMO = Path(__file__).resolve().parents[2] / "assets" / "lungvit-demo.safetensors"
PER_CLASS = 60  # fresh phantoms per class (540 images)
FRESH_SEED = 20  # the demo was trained on seed 1


def test_demo_checkpoint_is_small_and_says_what_it_is() -> None:
    assert DEMO.is_file(), "assets/lungvit-demo.safetensors is missing (see assets/README.md)"
    assert DEMO.stat().st_size <= 25 * 2**20
    info = read_checkpoint_info(DEMO)
    assert list(info.labels) == list(CLASS_NAMES)
    text = (info.notes + " " + info.intended_use).lower()
    for phrase in ("demo", "synthetic phantoms", "not for clinical use"):
        assert phrase in text, phrase
    acc = info.metrics["accuracy"]
    assert f"{acc:.1%}" in info.notes  # the measured accuracy is stated, not only stored
    prov = info.provenance
    assert prov.dataset_fingerprint and sum(prov.class_counts.values()) > 0
    assert prov.train_time_s and prov.epochs and prov.lungvit_version
    assert 0 < info.temperature < 20 and info.metrics["ood"]["energy_threshold"] is not None
    model, _ = load_checkpoint(DEMO)
    assert model.lungvit_config == info.model


def test_demo_model_scores_its_recorded_accuracy_on_fresh_phantoms(tmp_path: Path) -> None:
    if demo_model_path() is not None:  # the installed copy is the same file
        assert demo_model_path().read_bytes() == DEMO.read_bytes()
    recorded = read_checkpoint_info(DEMO).metrics["accuracy"]
    data = tmp_path / "fresh"
    assert cli_main(["demo-data", str(data), "--per-class", str(PER_CLASS),
                     "--seed", str(FRESH_SEED)]) == 0
    files = sorted(data.glob("*/*.png"))
    assert len(files) == PER_CLASS * len(CLASS_NAMES)
    predictor = Predictor.from_checkpoint(DEMO, batch_size=64)
    predictions = list(predictor.predict_files(files))
    correct = sum(p.label == f.parent.name for f, p in zip(files, predictions))
    accuracy = correct / len(files)
    assert accuracy == pytest.approx(recorded, abs=0.02), (accuracy, recorded)
