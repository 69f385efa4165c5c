"""Figures for the app: training curves and confusion matrices (matplotlib, headless)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on a server; must precede pyplot's import
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

_STYLE = {"axes.spines.top": False, "axes.spines.right": False, "font.size": 9,
          "axes.titlesize": 10, "axes.titleweight": "bold"}


def _finite(points: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept]


_SPLITS = {"train": "training", "val": "validation", "test": "test"}
_METRICS = {"loss": "loss", "acc": "accuracy"}


def curve_label(name: str) -> str:
    """A metric's name in words for a legend: ``train/loss_epoch`` -> "training loss
    (per epoch)", ``val/acc`` -> "validation accuracy"; other names unchanged."""
    split, _, metric = name.rpartition("/")
    base = metric.removesuffix("_epoch")
    words = f"{_SPLITS.get(split, split)} {_METRICS.get(base, base)}".strip()
    if split not in _SPLITS or base not in _METRICS:
        return name
    return words + (" (per epoch)" if metric.endswith("_epoch") else "")


def training_curves(series: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Loss (left) and accuracy (right) against the optimizer step.

    Args:
        series: metric name -> [(step, value), ...] as the store returns them; names
            ending in ``loss`` go left, ``acc`` right (``train/loss``, ``val/acc``, ...).

    Returns:
        A matplotlib figure (empty axes with a note when there is nothing yet).
    """
    with plt.rc_context(_STYLE):
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 2.8), layout="constrained")
        for ax, suffix, title in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
            names = sorted(n for n in series if n.split("/")[-1].removesuffix("_epoch") == suffix)
            for name in names:
                steps, values = _finite(series[name])
                if steps:
                    ax.plot(steps, values, marker="o" if len(steps) < 30 else None,
                            markersize=3, linewidth=1.5, label=curve_label(name))
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, frameon=False)
            else:
                ax.text(0.5, 0.5, "no values yet", ha="center", va="center",
                        transform=ax.transAxes, color="gray")
        if ax_acc.lines:
            ax_acc.set_ylim(0, 1.02)
    plt.close(fig)
    return fig


def confusion_matrix(matrix: Sequence[Sequence[float]], labels: Sequence[str],
                     title: str = "Confusion matrix (test split)") -> Figure:
    """A confusion matrix with counts in the cells, rows true, columns predicted.

    Args:
        matrix: (C, C) counts.
        labels: the C class names.
        title: the figure title.

    Returns:
        A matplotlib figure.
    """
    n = len(labels)
    side = max(3.5, 0.55 * n + 1.8)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(side + 0.8, side), layout="constrained")
        peak = max((max(row) for row in matrix), default=0) or 1
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=peak)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize=8,
                        color="white" if value > peak / 2 else "black")
        short = [label.removeprefix("lung-") for label in labels]
        ax.set_xticks(range(n), short, rotation=45, ha="right")
        ax.set_yticks(range(n), short)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        for side_name in ("top", "right"):
            ax.spines[side_name].set_visible(True)
    plt.close(fig)
    return fig
