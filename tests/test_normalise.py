"""The one normalise/denormalise pair, and that training, prediction and explanations use it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lungvit.core.explain.attributions import AttributionContext
from lungvit.core.model.preprocess import (PreprocessConfig, denormalize, normalize,
                                           to_model_input)
from lungvit.training.data.datamodule import Collate


@pytest.mark.parametrize("cfg", [PreprocessConfig(), PreprocessConfig(32, 0.45, 0.226)])
def test_normalize_then_denormalize_is_the_identity(cfg: PreprocessConfig) -> None:
    x = torch.rand(2, 1, 8, 8)
    y = normalize(x, cfg)
    assert torch.allclose(y, (x - cfg.mean) / cfg.std)
    assert torch.allclose(denormalize(y, cfg), x, atol=1e-6)
    assert np.allclose(denormalize(y.numpy(), cfg), x.numpy(), atol=1e-6)


def test_training_prediction_and_explanations_normalise_alike() -> None:
    cfg = PreprocessConfig(input_size=16, mean=0.4, std=0.2)
    pixels = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    # prediction's path
    pred_x = to_model_input(pixels, cfg)[0]
    # training's path: the cache stores uint16 at SCALE; use exact levels
    from lungvit.training.data.cache import SCALE
    raw = np.round(pixels * SCALE).astype(np.uint16)
    train_x, _ = Collate(cfg)((raw[None], np.zeros(1, dtype=np.int64)))
    assert torch.allclose(train_x[0, 0], normalize(torch.from_numpy(raw / SCALE).float(), cfg),
                          atol=1e-6)
    assert torch.allclose(train_x[0, 0], pred_x, atol=2 / SCALE / cfg.std)
    # explanations: black and white of the scan in input space
    ctx = AttributionContext.from_preprocess(cfg)
    assert ctx.value_range == pytest.approx((normalize(0.0, cfg), normalize(1.0, cfg)))
