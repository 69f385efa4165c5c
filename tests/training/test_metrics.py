"""Metrics and temperature scaling against hand-computed values."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lungvit.training.calibration import fit_temperature
from lungvit.training.metrics import (
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    precision_recall_f1,
    roc_auc_ovr,
    topk_accuracy,
)

# targets / predictions of a 3-class example worked out by hand below.
TARGETS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDS = torch.tensor([0, 1, 1, 1, 0, 2])


def test_confusion_matrix_rows_are_true_classes() -> None:
    cm = confusion_matrix(PREDS, TARGETS, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert cm.dtype == torch.int64


def test_precision_recall_f1_by_hand() -> None:
    cm = confusion_matrix(PREDS, TARGETS, 3)
    precision, recall, f1 = precision_recall_f1(cm)
    # class 0: tp 1 of 2 predicted, 1 of 2 true; class 1: 2 of 3 predicted, 2 of 2 true;
    # class 2: 1 of 1 predicted, 1 of 2 true.
    assert precision.tolist() == pytest.approx([0.5, 2 / 3, 1.0])
    assert recall.tolist() == pytest.approx([0.5, 1.0, 0.5])
    assert f1.tolist() == pytest.approx([0.5, 0.8, 2 / 3])
    assert macro_f1(cm) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert balanced_accuracy(cm) == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_zero_division_is_zero_and_absent_classes_are_left_out_of_averages() -> None:
    # Class 2 neither occurs nor is predicted; class 1 is predicted but never true.
    cm = confusion_matrix(torch.tensor([0, 1, 0]), torch.tensor([0, 0, 0]), 3)
    precision, recall, f1 = precision_recall_f1(cm)
    assert precision.tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert recall.tolist() == pytest.approx([2 / 3, 0.0, 0.0])
    assert macro_f1(cm) == pytest.approx((0.8 + 0.0) / 2)  # classes 0 and 1 only
    assert balanced_accuracy(cm) == pytest.approx(2 / 3)  # class 0 only


def test_topk_accuracy() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.4],   # target 2: 2nd best
                           [0.9, 0.05, 0.05],  # target 0: best
                           [0.2, 0.3, 0.5]])   # target 0: 3rd
    targets = torch.tensor([2, 0, 0])
    assert topk_accuracy(logits, targets, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, targets, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, targets, 5) == pytest.approx(1.0)  # k capped at C


def test_roc_auc_by_hand_with_ties_and_absent_class() -> None:
    # Class 0 positives score 0.9 and 0.4; negatives 0.5, 0.3, 0.4. Pairs won: 0.9 beats
    # all three (3), 0.4 beats 0.3 (1) and ties 0.4 (0.5): 4.5 of 6.
    p0 = torch.tensor([0.9, 0.4, 0.5, 0.3, 0.4])
    probs = torch.stack([p0, 1 - p0, torch.zeros(5)], dim=1)
    targets = torch.tensor([0, 0, 1, 1, 1])
    auc = roc_auc_ovr(probs, targets)
    assert auc[0].item() == pytest.approx(0.75)
    assert auc[1].item() == pytest.approx(0.75)  # the mirror image
    assert math.isnan(auc[2].item())  # class 2 never occurs: no AUC, no crash


def test_roc_auc_perfect_and_reversed() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    targets = torch.tensor([0, 0, 1, 1])
    assert roc_auc_ovr(probs, targets).tolist() == pytest.approx([1.0, 1.0])
    assert roc_auc_ovr(probs, 1 - targets).tolist() == pytest.approx([0.0, 0.0])


def test_expected_calibration_error_by_hand() -> None:
    # Four samples at confidence 0.9, three right (gap 0.15); two at 0.6, one right (0.1).
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    targets = torch.tensor([0, 0, 0, 1, 0, 1])
    assert expected_calibration_error(probs, targets) == pytest.approx((4 * 0.15 + 2 * 0.1) / 6)
    # Perfectly calibrated in every bin: zero.
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]] * 3),
                                      torch.tensor([0, 0, 0])) == pytest.approx(0.0)


def test_classification_report_is_json_ready_and_consistent() -> None:
    torch.manual_seed(0)
    logits = torch.randn(60, 6)
    targets = torch.randint(0, 5, (60,))  # class 5 absent
    labels = [f"c{i}" for i in range(6)]
    report = classification_report(logits, targets, labels=labels)
    json.dumps(report, allow_nan=False)  # NaN became None
    assert report["n"] == 60
    assert report["acc"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert report["top5"] is not None
    assert report["per_class"]["c5"]["auc"] is None
    assert report["per_class"]["c5"]["support"] == 0
    assert sum(sum(r) for r in report["confusion_matrix"]) == 60
    assert report["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    # Temperature changes confidence-based metrics only.
    hot = classification_report(logits, targets, labels=labels, temperature=3.0)
    assert hot["acc"] == report["acc"] and hot["loss"] != report["loss"]
    assert classification_report(logits[:, :3], targets.clamp(max=2))["top5"] is None


def _sample_labels(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial((logits / temperature).softmax(1), 1, generator=g)[:, 0]


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(true_t: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(20000, 9, generator=g)
    targets = _sample_labels(logits, true_t, seed=2)  # labels drawn from softmax(z / T)
    t = fit_temperature(logits, targets)
    assert t == pytest.approx(true_t, rel=0.05)
    ece_before = expected_calibration_error(logits.softmax(1), targets)
    ece_after = expected_calibration_error((logits / t).softmax(1), targets)
    assert ece_after < ece_before
    assert ece_after < 0.02


def test_temperature_scaling_degenerate_inputs() -> None:
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0
    # Everything right with large margins: T is pushed down but stays within its bounds.
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]] * 10)
    t = fit_temperature(logits, torch.tensor([0, 1] * 10))
    assert 0.04 <= t <= 1.0
    with pytest.raises(ValueError):
        fit_temperature(torch.zeros(3), torch.zeros(3, dtype=torch.long))
