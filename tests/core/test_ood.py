"""The learned out-of-scope detector: its math, its trip through a checkpoint, the Predictor."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from lungvit.core.model.checkpoint import (
    CheckpointInfo, load_checkpoint, read_checkpoint_info, save_checkpoint,
)
from lungvit.core.errors import CheckpointError
from lungvit.core.model.network import create_model
from lungvit.core.model.card import model_card
from lungvit.core.model.ood import TENSOR_PREFIX, FeatureDetector, features_and_logits, ledoit_wolf
from lungvit.core.predict import Predictor
from lungvit.core.model.preprocess import PreprocessConfig, to_model_input
from lungvit.core.io.scan import Scan, ScanMetadata

LABELS = ("a", "b", "c")


def _gaussians(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes in 8 dimensions sharing one correlated covariance."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(8, 8)) / 3 + np.eye(8)
    centres = np.random.default_rng(98).normal(scale=4.0, size=(3, 8))
    y = rng.integers(0, 3, n)
    x = centres[y] + rng.normal(size=(n, 8)) @ mix.T + shift
    return x, y


def _np_ledoit_wolf(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004), written out sample by sample."""
    n, d = centred.shape
    s = centred.T @ centred / n
    mu = np.trace(s) / d
    delta = np.linalg.norm(s - mu * np.eye(d), "fro") ** 2
    beta = sum(np.linalg.norm(np.outer(v, v) - s, "fro") ** 2 for v in centred) / n ** 2
    shrink = min(beta, delta) / delta
    return (1 - shrink) * s + shrink * mu * np.eye(d), shrink


def _np_distance(x: np.ndarray, train: np.ndarray, y: np.ndarray) -> np.ndarray:
    means = np.stack([train[y == c].mean(0) for c in range(3)])
    cov, _ = _np_ledoit_wolf(train - means[y])
    prec = np.linalg.inv(cov)
    d2 = np.stack([np.einsum("nd,de,ne->n", x - m, prec, x - m) for m in means], axis=1)
    return np.sqrt(d2.min(axis=1))


def _fit(quantile: float = 0.95) -> tuple[FeatureDetector, np.ndarray, np.ndarray]:
    train, y = _gaussians(600, seed=0)
    val, _ = _gaussians(300, seed=1)
    det = FeatureDetector.fit(torch.tensor(train), torch.tensor(y), torch.tensor(val), LABELS,
                              quantile=quantile)
    return det, train, y


def test_ledoit_wolf_matches_the_formula_written_out() -> None:
    rng = np.random.default_rng(3)
    for n, d in ((200, 5), (10, 30)):  # n >> d and n < d (singular sample covariance)
        x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d)
        x -= x.mean(0)
        cov, s = ledoit_wolf(torch.tensor(x))
        want, want_s = _np_ledoit_wolf(x)
        assert s == pytest.approx(want_s, rel=1e-9)
        np.testing.assert_allclose(cov.numpy(), want, rtol=1e-9, atol=1e-12)
        assert np.isfinite(np.linalg.inv(cov.numpy())).all()


def test_distances_and_threshold_match_numpy() -> None:
    det, train, y = _fit()
    probe, _ = _gaussians(50, seed=7, shift=1.5)
    got = det.distance(torch.tensor(probe)).numpy()
    np.testing.assert_allclose(got, _np_distance(probe, train, y), rtol=1e-4)
    val, _ = _gaussians(300, seed=1)
    assert det.threshold == pytest.approx(np.quantile(_np_distance(val, train, y), 0.95), rel=1e-4)
    assert det.labels == LABELS and det.n_train == 600 and det.n_val == 300


def test_separates_familiar_features_from_shifted_ones() -> None:
    det, _, _ = _fit()
    held_out, _ = _gaussians(1000, seed=2)
    shifted, _ = _gaussians(1000, seed=3, shift=6.0)
    familiar_rate = det.flags(torch.tensor(held_out)).float().mean().item()
    shifted_rate = det.flags(torch.tensor(shifted)).float().mean().item()
    assert 0.01 <= familiar_rate <= 0.10, familiar_rate  # ~5%: the 95% validation quantile
    assert shifted_rate >= 0.95, shifted_rate


def test_bad_inputs_are_refused() -> None:
    x, y = _gaussians(30, seed=0)
    with pytest.raises(ValueError, match="quantile"):
        FeatureDetector.fit(torch.tensor(x), torch.tensor(y), torch.tensor(x), LABELS, quantile=0)
    with pytest.raises(ValueError, match="validation"):
        FeatureDetector.fit(torch.tensor(x), torch.tensor(y), torch.zeros(0, 8), LABELS)


# ------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lungvit_tiny", num_classes=3).eval()


def _scan(pixels: np.ndarray) -> Scan:
    return Scan(pixels.astype(np.float32), ScanMetadata(source_format="png", name="x.png"))


def _xray_like(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-((xx - 0.5) ** 2 / 0.08 + (yy - 0.5) ** 2 / 0.12))
    return np.clip(body * rng.uniform(0.6, 0.9) + rng.normal(0, 0.03, (size, size)), 0, 1)


def _inputs(images: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([to_model_input(im, PreprocessConfig(64)) for im in images])


@pytest.fixture(scope="module")
def fitted(tiny: torch.nn.Module) -> FeatureDetector:
    """A detector fitted on the tiny model's features of x-ray-like images."""
    with torch.no_grad():
        train, _ = features_and_logits(tiny, _inputs([_xray_like(s) for s in range(60)]))
        val, _ = features_and_logits(tiny, _inputs([_xray_like(s) for s in range(60, 90)]))
    return FeatureDetector.fit(train, torch.arange(60) % 3, val, LABELS, quantile=1.0)


def test_round_trip_through_a_checkpoint(tiny, fitted, tmp_path: Path) -> None:
    info = CheckpointInfo(labels=LABELS, metrics={"ood": {"energy_threshold": 1.0}},
                          ood_detector=fitted)
    path = save_checkpoint(tmp_path / "m.safetensors", tiny, info)
    model, loaded = load_checkpoint(path)
    assert loaded.ood_detector == fitted and loaded.format_version == 2
    assert read_checkpoint_info(path).ood_detector == fitted
    assert not any(k.startswith(TENSOR_PREFIX) for k in model.state_dict())
    stored = safetensors.torch.load(path.read_bytes())
    assert torch.equal(stored[f"{TENSOR_PREFIX}precision"], fitted.precision)
    assert f"beyond {fitted.threshold:.4g}" in model_card(loaded)
    # A detector for another embedding width is refused at save time.
    wrong = FeatureDetector(torch.zeros(3, 5), torch.eye(5), 1.0, LABELS)
    with pytest.raises(CheckpointError, match="64 wide"):
        save_checkpoint(tmp_path / "w.safetensors", tiny, CheckpointInfo(labels=LABELS,
                                                                         ood_detector=wrong))


def test_a_checkpoint_without_detector_stays_format_1_and_predicts(tiny, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "old.safetensors", tiny, CheckpointInfo(labels=LABELS))
    doc = json.loads(safetensors.safe_open(path, "pt").metadata()["lungvit"])
    assert doc["format_version"] == 1 and "ood_detector" not in doc
    # Exactly what LungViT wrote before detectors existed: weights only, format 1.
    tensors = safetensors.torch.load(path.read_bytes())
    assert not any(k.startswith(TENSOR_PREFIX) for k in tensors)
    assert "Out-of-scope detection" not in model_card(read_checkpoint_info(path))
    predictor = Predictor.from_checkpoint(path, device="cpu")
    assert predictor.detector is None
    pred = predictor.predict(_scan(_xray_like(0)))
    assert pred.feature_distance is None and pred.feature_threshold is None
    assert not any("feature distance" in r for r in pred.ood_reasons)


def test_a_header_naming_a_detector_without_its_tensors_is_damaged(tiny, fitted,
                                                                   tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", tiny,
                           CheckpointInfo(labels=LABELS, ood_detector=fitted))
    tensors = safetensors.torch.load(path.read_bytes())
    meta = safetensors.safe_open(path, "pt").metadata()
    kept = {k: v for k, v in tensors.items() if k != f"{TENSOR_PREFIX}means"}
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(kept, broken, metadata=meta)
    with pytest.raises(CheckpointError, match="damaged LungViT header"):
        load_checkpoint(broken)


def test_predictor_flags_a_far_input_and_reports_the_distance(tiny, fitted,
                                                              tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", tiny,
                           CheckpointInfo(labels=LABELS, ood_detector=fitted))
    predictor = Predictor.from_checkpoint(path, device="cpu")
    checker = (np.indices((64, 64)).sum(0) // 4 % 2).astype(np.float32)  # a test pattern
    familiar, far = predictor.predict_scans([_scan(_xray_like(61)), _scan(checker)])
    # Independently: the [CLS] token (index 0 of the normed tokens) and numpy Mahalanobis.
    with torch.no_grad():
        x = _inputs([_xray_like(61), checker])
        cls = tiny.forward_features(x)[:, 0].numpy().astype(np.float64)
        np.testing.assert_allclose(features_and_logits(tiny, x)[1], tiny(x), atol=1e-5)
    means, prec = fitted.means.double().numpy(), fitted.precision.double().numpy()
    want = [np.sqrt(min((f - m) @ prec @ (f - m) for m in means)) for f in cls]
    assert familiar.feature_distance == pytest.approx(want[0], rel=1e-3)
    assert far.feature_distance == pytest.approx(want[1], rel=1e-3)
    assert far.feature_distance > fitted.threshold >= familiar.feature_distance
    assert far.out_of_distribution
    assert any("unlike the scans this model was trained on (feature distance" in r
               for r in far.ood_reasons), far.ood_reasons
    assert not familiar.out_of_distribution, familiar.ood_reasons
    record = far.to_dict()
    assert record["feature_distance"] == far.feature_distance
    assert record["feature_threshold"] == pytest.approx(fitted.threshold)
    json.dumps(record)  # JSON-ready
