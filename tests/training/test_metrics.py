"""Metrics and temperature scaling against hand-computed values."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from lungvit.training.learn.calibration import fit_temperature
from lungvit.training.learn.metrics import (
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


# ------------------------------------------------ cross-checks against independent code
def _np_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """ECE with bins ((b-1)/n, b/n], the first also holding 0, by a loop over bins."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inside.any():
            total += abs((pred[inside] == targets[inside]).sum() - conf[inside].sum())
    return total / len(targets)


def _np_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney by all positive/negative pairs; a tie counts one half."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_a_numpy_computation_with_absent_classes(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, c = 300, 6
    logits = 2 * torch.randn(n, c, generator=g)
    # class 5 never occurs; class 4 is the true class of a single sample.
    targets = torch.randint(0, 4, (n,), generator=g)
    targets[7] = 4
    z, t = logits.double().numpy(), targets.numpy()
    order = np.argsort(-z, axis=1)
    for k in (1, 2, 5):
        expected = np.mean([t[i] in order[i, :k] for i in range(n)])
        assert topk_accuracy(logits, targets, k) == pytest.approx(expected, abs=1e-6)

    pred = z.argmax(axis=1)
    cm_np = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm_np, (t, pred), 1)
    cm = confusion_matrix(logits.argmax(1), targets, c)
    assert cm.dtype == torch.int64 and cm.tolist() == cm_np.tolist()

    tp = np.diag(cm_np).astype(float)
    predicted, actual = cm_np.sum(axis=0), cm_np.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_np = np.where(predicted > 0, tp / predicted, 0.0)
        r_np = np.where(actual > 0, tp / actual, 0.0)
        f_np = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0)
    precision, recall, f1 = precision_recall_f1(cm)
    np.testing.assert_allclose(precision.numpy(), p_np, atol=1e-12)
    np.testing.assert_allclose(recall.numpy(), r_np, atol=1e-12)
    np.testing.assert_allclose(f1.numpy(), f_np, atol=1e-12)
    assert macro_f1(cm) == pytest.approx(f_np[(predicted + actual) > 0].mean())
    assert balanced_accuracy(cm) == pytest.approx(r_np[actual > 0].mean())

    probs = logits.softmax(1)
    auc = roc_auc_ovr(probs, targets)
    p = probs.double().numpy()
    expected_auc = [_np_auc(p[:, j], t == j) for j in range(c)]
    # torchmetrics divides integer counts in float32: AUCs agree to float32 precision.
    np.testing.assert_allclose(auc.numpy(), expected_auc, rtol=1e-6)  # NaN for class 5
    assert math.isnan(auc[5]) and not math.isnan(auc[4])
    for n_bins in (15, 7):
        assert expected_calibration_error(probs, targets, n_bins) == pytest.approx(
            _np_ece(p, t, n_bins), abs=1e-9)

    report = classification_report(logits, targets)
    assert report["macro_auc"] == pytest.approx(np.nanmean(expected_auc), rel=1e-6)
    assert report["confusion_matrix"] == cm_np.tolist()
    assert [report["per_class"][str(j)]["f1"] for j in range(c)] == pytest.approx(f_np.tolist())


def test_ratios_from_the_confusion_matrix_agree_with_torchmetrics() -> None:
    # precision_recall_f1 / macro_f1 work on a confusion matrix, torchmetrics on labels: the
    # same numbers, class 5 (absent from targets and predictions) left out of the macro F1.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 6, generator=g)
    logits[:, 5] -= 100  # never predicted
    targets = torch.randint(0, 5, (200,), generator=g)
    preds = logits.argmax(1)
    precision, recall, f1 = precision_recall_f1(confusion_matrix(preds, targets, 6))
    for ours, metric in ((precision, MulticlassPrecision), (recall, MulticlassRecall),
                         (f1, MulticlassF1Score)):
        theirs = metric(num_classes=6, average=None)(preds, targets)
        np.testing.assert_allclose(ours.numpy(), theirs.double().numpy(), atol=1e-6)
    assert macro_f1(confusion_matrix(preds, targets, 6)) == pytest.approx(
        MulticlassF1Score(num_classes=6, average="macro")(preds, targets).item(), abs=1e-6)


def test_top1_ties_go_to_the_lowest_index_like_the_confusion_matrix() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([1, 0, 2])  # the first two hit on the lowest tied index
    cm = confusion_matrix(logits.argmax(1), targets, 4)
    assert topk_accuracy(logits, targets, 1) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, targets, 1) == pytest.approx(cm.trace().item() / 3)


def test_auc_of_an_absent_class_is_nan_without_a_warning() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auc = roc_auc_ovr(probs, torch.tensor([0, 1, 0]))
        assert torch.isnan(roc_auc_ovr(probs, torch.tensor([0, 0, 0]))).all()  # one class only
    assert auc[:2].tolist() == pytest.approx([1.0, 1.0]) and math.isnan(auc[2])


def test_ece_keeps_a_confidence_of_one_in_the_last_bin() -> None:
    # Confidences 1.0 (wrong) and 0.95 (right) share the bin (14/15, 1]: acc 0.5 against
    # mean confidence 0.975. (torchmetrics' calibration error gives 1.0 a bin of its own
    # and would say (1.0 + 0.05) / 2 = 0.525.)
    probs = torch.tensor([[1.0, 0.0], [0.95, 0.05]])
    targets = torch.tensor([1, 0])
    assert expected_calibration_error(probs, targets) == pytest.approx(0.475)
