"""Fit the learned out-of-scope detector at the end of a training run.

:func:`attach_feature_detector` is called once by :func:`lungvit.training.learn.fit.fit`, after
the best weights are loaded: it reads the [CLS] features of the *un-augmented* training
split (the detector must describe the scans as the app will see them, not as augmentation
distorted them), fits :class:`lungvit.core.model.ood.FeatureDetector` on them, sets its threshold
on the validation split, measures how many validation and test scans it flags, and returns
the checkpoint header with the detector and those rates (``metrics["ood"]["features"]``).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import DataLoader

from lungvit.core.model.checkpoint import CheckpointInfo
from lungvit.core.model.ood import DEFAULT_QUANTILE, FeatureDetector, collect_features
from lungvit.training.data.datamodule import Collate, ScanDataModule

log = logging.getLogger(__name__)


def split_features(model: nn.Module, dm: ScanDataModule, split: str,
                   device: torch.device | str = "cpu", batch_size: int = 256,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) [CLS] features and (N,) targets of one split, never augmented, in order."""
    loader = DataLoader(dm.datasets[split], batch_size=batch_size, shuffle=False,
                        collate_fn=Collate(dm.preprocess))
    return collect_features(model, loader, device)


def attach_feature_detector(info: CheckpointInfo, model: nn.Module, dm: ScanDataModule,
                            device: torch.device | str = "cpu", *,
                            quantile: float = DEFAULT_QUANTILE) -> CheckpointInfo:
    """``info`` with a feature detector fitted on ``model``'s features of ``dm``'s splits.

    Args:
        info: the checkpoint header about to be saved (its ``metrics["ood"]`` is extended).
        model: the trained model (left on the CPU, in eval mode).
        dm: the run's set-up data module (train, val and test splits).
        device: where to compute the features.
        quantile: share of validation scans kept below the threshold.

    Returns:
        A copy of ``info`` with ``ood_detector`` set and ``metrics["ood"]["features"]``
        = {method, threshold, quantile, shrinkage, n_train, val_flag_rate, test_flag_rate,
        n_val, n_test}; ``info`` unchanged (with a warning) when a split has no scans.
    """
    train, train_y = split_features(model, dm, "train", device)
    val, _ = split_features(model, dm, "val", device)
    test, _ = split_features(model, dm, "test", device)
    model.cpu()
    if len(train) == 0 or len(val) == 0:
        log.warning("no feature detector: the training or validation split is empty")
        return info
    det = FeatureDetector.fit(train, train_y, val, info.labels, quantile=quantile)
    summary = {**det.header(), "val_flag_rate": float(det.flags(val).double().mean()),
               "test_flag_rate": float(det.flags(test).double().mean()) if len(test) else None,
               "n_test": len(test), "source": "train split fit, validation split threshold"}
    summary.pop("labels")
    summary.pop("feature")
    metrics = dict(info.metrics)
    metrics["ood"] = {**metrics.get("ood", {}), "features": summary}
    return replace(info, ood_detector=det, metrics=metrics)
