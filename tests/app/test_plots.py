"""Figures of the app: curve legends in words."""
from __future__ import annotations

from lungvit.app.plots import curve_label, training_curves


def test_curve_legends_are_words() -> None:
    assert curve_label("train/loss_epoch") == "training loss (per epoch)"
    assert curve_label("train/loss") == "training loss"
    assert curve_label("val/loss") == "validation loss"
    assert curve_label("val/acc") == "validation accuracy"
    assert curve_label("compare/base_acc") == "compare/base_acc"  # unknown: left as stored
    fig = training_curves({"train/loss": [(1, 2.0), (2, 1.5)], "val/loss": [(2, 1.7)],
                           "val/acc": [(2, 0.5)]})
    legends = [t.get_text() for ax in fig.axes if ax.get_legend()
               for t in ax.get_legend().get_texts()]
    assert legends == ["training loss", "validation loss", "validation accuracy"]
