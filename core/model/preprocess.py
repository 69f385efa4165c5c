"""The one preprocessing path from a decoded scan to the model's input tensor.

Training, prediction, explanations and the app all normalise with :func:`normalize` (the
app shows a model input back with :func:`denormalize`), prediction and explanations through
:func:`to_model_input`; the constants come from the checkpoint (:class:`PreprocessConfig` is stored in its header),
so a model always sees its inputs the way it saw them in training.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreprocessConfig:
    """How a [0, 1] grayscale scan becomes a model input.

    Args:
        input_size: side of the square model input in pixels.
        mean: subtracted after scaling to [0, 1] (reference design: 0.5).
        std: divisor after the mean (reference design: 0.5).
    """

    input_size: int = 64
    mean: float = 0.5
    std: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(**{k: data[k] for k in ("input_size", "mean", "std") if k in data})


def resize_pixels(pixels: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Resize an (H, W) image in [0, 1] to (size, size), anti-aliased.

    The whole frame is resized (no crop), as in the reference design, so a model-resolution
    map maps back onto the scan by the inverse resize alone.

    Returns:
        A float32 tensor of shape (size, size).
    """
    t = torch.as_tensor(pixels, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"expected an (H, W) image, got shape {tuple(t.shape)}")
    if tuple(t.shape) == (size, size):
        return t.clone()
    # antialias=True makes strong down-sampling (2048 -> 64) average, not alias.
    out = F.interpolate(t[None, None], size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0, 0].clamp_(0.0, 1.0)


def normalize(x: torch.Tensor | float, cfg: PreprocessConfig) -> torch.Tensor | float:
    """Pixels in [0, 1] (a tensor of any shape, or one value) -> the model's input values:
    (x - mean) / std."""
    return (x - cfg.mean) / cfg.std


def denormalize(x: torch.Tensor | np.ndarray, cfg: PreprocessConfig) -> torch.Tensor | np.ndarray:
    """The inverse of :func:`normalize`: model input values -> pixels in [0, 1] (unclipped)."""
    return x * cfg.std + cfg.mean


def to_model_input(pixels: np.ndarray | torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Turn (H, W) pixels in [0, 1] into a normalised (1, S, S) model input."""
    return normalize(resize_pixels(pixels, cfg.input_size), cfg)[None]  # (1, S, S)


def upsample_map(heatmap: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Map a model-resolution (h, w) map back onto a scan of ``shape`` (H, W).

    The inverse of :func:`resize_pixels`: both treat the whole frame, so pixel centres
    line up.
    """
    t = torch.as_tensor(heatmap, dtype=torch.float32)
    out = F.interpolate(t[None, None], size=tuple(shape), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()
