"""Is the fine-tuned model better than the one it replaces? Both on the job's own test split.

:func:`compare_with_base` runs the base model (``TrainConfig.compare_to``, else
``from_checkpoint``) over the frozen test split of a run, with the base's own preprocessing
(its input size, mean and std, through the same preprocessing cache training reads), and
sets its answers beside the fine-tuned model's.

The two models may have different label lists. The comparison is made on the test scans
whose true label the base model also has (matched by name): the scans of classes the base
never learnt are left out, since it could not get them right. The base answers with its
own full label list, as it would when served (an answer naming a class the run does not
have counts as wrong). ``tuned_all`` also gives the fine-tuned model's figures on the whole
test split. Accuracy and macro recall (the mean of per-class recall over the classes in the
compared scans) are reported, and ``delta`` is tuned minus base, as fractions.

"Better" means a higher accuracy and a macro recall that is not lower; the app warns
before serving a model that is not better, or whose comparison rests on fewer than
:data:`MIN_TEST_SCANS` scans.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lungvit.core.model.checkpoint import load_checkpoint
from lungvit.core.errors import CheckpointError
from lungvit.core.model.preprocess import PreprocessConfig
from lungvit.training.data.cache import PreprocessCache
from lungvit.training.config import TrainConfig
from lungvit.training.data.discover import Sample
from lungvit.training.data.datamodule import CachedScans, Collate

log = logging.getLogger(__name__)

MIN_TEST_SCANS = 30  # fewer compared scans: the app asks the user to acknowledge it


def label_metrics(predicted: Sequence[str], true: Sequence[str]) -> dict[str, Any]:
    """Accuracy and per-class / macro recall of label predictions.

    Args:
        predicted: the predicted label of each scan.
        true: its true label.

    Returns:
        ``{"n", "acc", "macro_recall", "recall"}``; recall is per true class, macro recall
        their mean (None for no scans).
    """
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predictions for {len(true)} scans")
    n = len(true)
    if n == 0:
        return {"n": 0, "acc": None, "macro_recall": None, "recall": {}}
    hits = Counter(t for p, t in zip(predicted, true) if p == t)
    support = Counter(true)
    recall = {c: hits[c] / support[c] for c in sorted(support)}
    return {"n": n, "acc": sum(hits.values()) / n,
            "macro_recall": float(np.mean(list(recall.values()))), "recall": recall}


@torch.no_grad()
def model_logits(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """(N, C) fp32 logits of ``model`` (eval mode) over a loader of (x, y), on the CPU."""
    model = model.to(device).eval()
    out = [model(x.to(device)).float().cpu() for x, _ in loader]
    return torch.cat(out) if out else torch.zeros(0, 0)


def predict_samples(model: nn.Module, labels: Sequence[str], preprocess: PreprocessConfig,
                    samples: Sequence[Sample], *, cache_dir: str | Path,
                    device: torch.device | str = "cpu", batch_size: int = 64
                    ) -> list[str | None]:
    """A model's predicted label for each sample, read through the preprocessing cache.

    Args:
        model: the model; labels: its output labels in order.
        preprocess: its preprocessing (input size, mean, std).
        samples: the scans.
        cache_dir: the preprocessing cache root (the run's).
        device: where to run.
        batch_size: scans per forward pass.

    Returns:
        One label per sample; None where the file could not be read.
    """
    result = PreprocessCache(cache_dir, preprocess).build(list(samples))
    ok = np.flatnonzero(result.ok)
    data = CachedScans(result.path, ok.astype(np.int64), np.zeros(len(ok), np.int64),
                       preprocess)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False,
                        collate_fn=Collate(preprocess))
    out: list[str | None] = [None] * len(samples)
    if len(ok):
        for i, k in zip(ok, model_logits(model, loader, device).argmax(1).tolist()):
            out[int(i)] = labels[k]
    return out


def compare_predictions(base: Sequence[str | None], tuned: Sequence[str], true: Sequence[str],
                        base_labels: Sequence[str]) -> dict[str, Any]:
    """Base and fine-tuned answers on the same scans (see the module docstring).

    Args:
        base: the base model's label per scan (None: it could not read the scan).
        tuned: the fine-tuned model's label per scan.
        true: the true label per scan.
        base_labels: every label the base model has.

    Returns:
        The comparison dict (``base``, ``tuned``, ``tuned_all``, ``n_test``, ``delta``,
        ``better``, classes compared and left out, a note).
    """
    known = set(base_labels)
    keep = [i for i, t in enumerate(true) if t in known and base[i] is not None]
    unknown = sorted({t for t in true if t not in known})
    base_m = label_metrics([base[i] for i in keep], [true[i] for i in keep])
    tuned_m = label_metrics([tuned[i] for i in keep], [true[i] for i in keep])
    out: dict[str, Any] = {
        "n_test": len(keep), "n_test_total": len(true),
        "classes_compared": sorted({true[i] for i in keep}),
        "classes_unknown_to_base": unknown,
        "base": base_m, "tuned": tuned_m, "tuned_all": label_metrics(tuned, true),
        "delta": None, "better": None,
    }
    if keep:
        out["delta"] = {k: tuned_m[k] - base_m[k] for k in ("acc", "macro_recall")}
        out["better"] = bool(out["delta"]["acc"] > 0 and out["delta"]["macro_recall"] >= 0)
    notes = []
    if unknown:
        notes.append(f"{sum(t in unknown for t in true)} test scan(s) of "
                     f"{', '.join(unknown)} left out: the base model has no such class")
    if not keep:
        notes.append("no test scan of a class the base model knows: no comparison")
    out["note"] = "; ".join(notes)
    return out


def compare_with_base(cfg: TrainConfig, dm: Any, test_logits: torch.Tensor,
                      test_targets: torch.Tensor,
                      device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """Evaluate the run's base model on its test split beside the fine-tuned model.

    Args:
        cfg: the resolved run configuration (``compare_to``, else ``from_checkpoint``).
        dm: the run's set-up :class:`~lungvit.training.data.datamodule.ScanDataModule`.
        test_logits: (N, C) the fine-tuned model's test logits, in test-split order.
        test_targets: (N,) their class indices.
        device: where to run the base model.

    Returns:
        The comparison (see :func:`compare_predictions`) plus ``base_model`` (its file
        name); None when the run has no base model. A base that cannot be read gives
        ``{"error": ...}``: a finished training is never failed by its comparison.
    """
    path = getattr(cfg, "compare_to", None) or cfg.from_checkpoint
    if path is None:
        return None
    try:
        base, info = load_checkpoint(path)
    except CheckpointError as exc:
        log.warning("could not compare with %s: %s", path, exc)
        return {"base_model": Path(path).name, "error": str(exc)}
    preprocess = info.preprocess or PreprocessConfig(input_size=info.model.img_size)
    samples = [dm.samples[i] for i in dm.splits["test"]]
    base_pred = predict_samples(base, info.labels, preprocess, samples,
                                cache_dir=dm.cache_dir, device=device)
    classes = list(dm.classes)
    tuned = [classes[k] for k in test_logits.argmax(1).tolist()] if len(samples) else []
    true = [classes[k] for k in test_targets.tolist()]
    out = compare_predictions(base_pred, tuned, true, info.labels)
    return {"base_model": Path(path).name, **out}


def comparison_scalars(comparison: dict[str, Any] | None) -> dict[str, float]:
    """The comparison as flat numbers for the store's final metrics (``compare/...``)."""
    if not comparison or comparison.get("error") or comparison.get("base") is None:
        return {}
    out = {"compare/n_test": float(comparison["n_test"]),
           "compare/n_test_total": float(comparison["n_test_total"])}
    if comparison["n_test"]:
        for who in ("base", "tuned"):
            for key in ("acc", "macro_recall"):
                out[f"compare/{who}_{key}"] = float(comparison[who][key])
        for key in ("acc", "macro_recall"):
            out[f"compare/delta_{key}"] = float(comparison["delta"][key])
        out["compare/better"] = float(bool(comparison["better"]))
    return out


def describe_comparison(comparison: dict[str, Any] | None) -> str:
    """One or two lines for the printed summary ("" when there is nothing to compare)."""
    if not comparison:
        return ""
    name = comparison.get("base_model", "the base model")
    if comparison.get("error"):
        return f"comparison with {name} failed: {comparison['error']}"
    if not comparison.get("n_test"):
        return f"comparison with {name}: {comparison.get('note') or 'no test scans'}"
    b, t, d = comparison["base"], comparison["tuned"], comparison["delta"]
    word = ("the same accuracy" if d["acc"] == 0 else
            f"{'better' if d['acc'] > 0 else 'worse'} by {abs(d['acc']) * 100:.1f} points")
    line = (f"vs {name} on {comparison['n_test']} test scans: accuracy {b['acc']:.1%} -> "
            f"{t['acc']:.1%} ({word}), macro recall "
            f"{b['macro_recall']:.1%} -> {t['macro_recall']:.1%}")
    return line + (f"\n  ({comparison['note']})" if comparison.get("note") else "")
