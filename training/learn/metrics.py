"""Classification metrics as pure functions on tensors.

Every function takes logits or probabilities of shape (N, C) and integer targets of
shape (N,) and returns tensors or plain Python numbers; nothing here knows about
Lightning, devices or distributed training, so each is tested against hand-computed
values. :func:`classification_report` gathers them into the dict that is logged during
training and stored in a checkpoint's provenance.

Top-k accuracy, the confusion matrix and ROC-AUC come from torchmetrics' functional API;
what is left here is the handling of empty inputs and absent classes (which torchmetrics
scores 0 where these conventions say NaN or leave the class out), the ratios read off the
confusion matrix, and the calibration error, whose binning torchmetrics does not offer.

Conventions (those of scikit-learn where it has one):
- A ratio whose denominator is zero (precision of a class never predicted, recall of a
  class absent from the targets) is 0.
- Macro averages run over the classes present in the targets or the predictions.
- Balanced accuracy is the mean recall over the classes present in the targets.
- ROC-AUC is one-vs-rest per class, exact (a tie counts one half); it is NaN for a class
  that is absent from the targets or is the only one present.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_confusion_matrix,
)


def _check(scores: torch.Tensor, targets: torch.Tensor) -> None:
    if scores.ndim != 2 or targets.ndim != 1 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"expected scores (N, C) and targets (N,), got {tuple(scores.shape)} "
                         f"and {tuple(targets.shape)}")


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose target is among the ``k`` highest scores.

    For ``k`` = 1 the prediction is the argmax (the lowest index among tied top scores, as
    in :func:`confusion_matrix`); for larger ``k`` ties are broken by :func:`torch.topk`.
    ``k`` is capped at the number of classes; an empty input gives NaN (torchmetrics: 0).
    """
    _check(logits, targets)
    if logits.shape[0] == 0:
        return math.nan
    k = min(k, logits.shape[1])
    # micro average: hits over all samples, i.e. the fraction of samples with a hit.
    return multiclass_accuracy(logits, targets, num_classes=logits.shape[1], top_k=k,
                               average="micro").item()


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    return multiclass_confusion_matrix(preds.long(), targets.long(), num_classes)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


# Precision, recall, F1 and their averages stay arithmetic on the confusion matrix: the
# public functions below take a matrix, and torchmetrics' take labels (it derives the same
# tp / fp / fn from its own confusion matrix and divides them the same way). The tests check
# them against MulticlassPrecision / Recall / F1Score (average=None, and "macro" for F1,
# whose classes with tp + fp + fn == 0 are left out just as here).
def precision_recall_f1(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class precision, recall and F1 from a confusion matrix (zero where undefined)."""
    cm = cm.double()
    tp = cm.diagonal()
    predicted = cm.sum(dim=0)
    actual = cm.sum(dim=1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, actual)
    f1 = _safe_div(2 * tp, predicted + actual)  # = 2PR / (P + R), zero when both are zero
    return precision, recall, f1


def macro_f1(cm: torch.Tensor) -> float:
    """Mean F1 over the classes present in the targets or the predictions."""
    _, _, f1 = precision_recall_f1(cm)
    present = (cm.sum(dim=0) + cm.sum(dim=1)) > 0
    return f1[present].mean().item() if present.any() else math.nan


def balanced_accuracy(cm: torch.Tensor) -> float:
    """Mean recall over the classes present in the targets."""
    _, recall, _ = precision_recall_f1(cm)
    present = cm.sum(dim=1) > 0
    return recall[present].mean().item() if present.any() else math.nan


def roc_auc_ovr(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class one-vs-rest ROC-AUC (C,), float64; NaN where a class cannot be scored.

    AUC is the Mann-Whitney statistic: the probability that a random positive scores above
    a random negative, ties counting one half (the exact area under the ROC curve).
    """
    _check(probs, targets)
    n, c = probs.shape
    out = torch.full((c,), math.nan, dtype=torch.float64)
    # Each scorable class is its own binary problem: torchmetrics' multiclass AUROC scores
    # a class without positives or negatives 0 (with a warning), and these are NaN here.
    # binary_auroc leaves probabilities in [0, 1] as they are; thresholds=None is exact
    # (up to float32 rounding: it divides its integer counts in float32).
    for k in range(c):
        pos = (targets == k).long()  # (N,)
        n_pos = int(pos.sum())
        if n_pos == 0 or n_pos == n:
            continue
        out[k] = binary_auroc(probs[:, k].double(), pos, thresholds=None).item()
    return out


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor,
                               n_bins: int = 15) -> float:
    """ECE: confidence-weighted gap between accuracy and confidence over equal-width bins.

    Confidence is the top probability; bin b holds confidences in ((b-1)/n_bins, b/n_bins]
    (the first bin also holds 0). ECE = sum_b |acc_b - conf_b| * n_b / N.

    Not torchmetrics' ``multiclass_calibration_error``: its bins are closed on the left,
    [(b-1)/n_bins, b/n_bins), with a bin of its own for confidence 1.0, so a confidence on
    an edge (a saturated softmax gives 1.0 exactly) can land in another bin and change the
    result; its public API takes a bin count, not edges.
    """
    _check(probs, targets)
    if probs.shape[0] == 0:
        return math.nan
    conf, pred = probs.double().max(dim=1)
    correct = (pred == targets).double()
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1  # (N,) in [0, n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    return ((acc_sum - conf_sum).abs().sum() / probs.shape[0]).item()


def _num(x: float) -> float | None:
    """A JSON-safe number: NaN becomes None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def classification_report(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    labels: Sequence[str] | None = None,
    temperature: float = 1.0,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Every metric LungViT reports for one evaluation, as a JSON-ready dict.

    Args:
        logits: (N, C) raw model outputs.
        targets: (N,) class indices.
        labels: class names (C); defaults to "0".."C-1".
        temperature: logits are divided by it before softmax (calibration); argmax-based
            metrics do not change with it.
        n_bins: bins of the expected calibration error.

    Returns:
        Scalars ``loss``, ``acc``, ``top5`` (None under 5 classes), ``macro_f1``,
        ``balanced_acc``, ``macro_auc``, ``ece``, ``n``; ``per_class`` mapping each label to
        precision, recall, f1, auc, support; ``confusion_matrix`` (rows true, columns
        predicted); ``labels``. NaN values are stored as None.
    """
    _check(logits, targets)
    logits = logits.detach().float().cpu()
    targets = targets.detach().long().cpu()
    c = logits.shape[1]
    labels = list(labels) if labels is not None else [str(i) for i in range(c)]
    if len(labels) != c:
        raise ValueError(f"{len(labels)} labels for {c} classes")
    scaled = logits / temperature
    probs = scaled.softmax(dim=1)
    n = logits.shape[0]
    loss = F.cross_entropy(scaled, targets).item() if n else math.nan
    cm = confusion_matrix(logits.argmax(dim=1), targets, c)
    precision, recall, f1 = precision_recall_f1(cm)
    auc = roc_auc_ovr(probs, targets)
    support = cm.sum(dim=1)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "auc": _num(float(auc[i])),
            "support": int(support[i]),
        }
        for i, name in enumerate(labels)
    }
    valid_auc = auc[~auc.isnan()]
    return {
        "n": n,
        "loss": _num(loss),
        "acc": _num(topk_accuracy(logits, targets, 1)),
        "top5": _num(topk_accuracy(logits, targets, 5)) if c >= 5 else None,
        "macro_f1": _num(macro_f1(cm)),
        "balanced_acc": _num(balanced_accuracy(cm)),
        "macro_auc": _num(valid_auc.mean().item()) if len(valid_auc) else None,
        "ece": _num(expected_calibration_error(probs, targets, n_bins)),
        "temperature": float(temperature),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "labels": labels,
    }


SCALAR_KEYS = ("loss", "acc", "top5", "macro_f1", "balanced_acc", "macro_auc", "ece")


def scalar_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a :func:`classification_report` that have a value."""
    return {k: float(report[k]) for k in SCALAR_KEYS if report.get(k) is not None}
