"""Batched, vectorised data augmentation for grayscale scans in [0, 1].

One random affine per sample (rotation, scale, translation, optional horizontal flip)
applied with a single ``affine_grid`` + ``grid_sample`` for the whole batch, then random
brightness and contrast. Horizontal flips are off by default: a chest X-ray's left and
right are not interchangeable (heart, situs). The optional RandAugment-style policy picks
``randaugment_ops`` operations per sample from :data:`RANDAUGMENT_OPS` at a fixed
magnitude (0..10) with random sign; geometric ones fold into the same affine, so there is
still one resampling per batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Geometric ops first (they fold into the affine), then intensity ops (applied in order).
RANDAUGMENT_OPS: tuple[str, ...] = (
    "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
    "brightness", "contrast", "gamma", "sharpness", "autocontrast", "posterize",
    "solarize", "noise", "identity",
)
# Strength of each op at magnitude 10 (the RandAugment paper's scale).
_MAX = {"rotate": 30.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 0.15,
        "translate_y": 0.15, "brightness": 0.3, "contrast": 0.5, "gamma": 0.5,
        "sharpness": 0.9, "posterize": 4.0, "solarize": 1.0, "noise": 0.05}


@dataclass(frozen=True)
class AugmentConfig:
    """How strongly to perturb training images (all zero: no change).

    Args:
        rotation_deg: rotation drawn from U(-r, r) degrees.
        scale: zoom factor drawn from U(lo, hi); above 1 zooms in.
        translate: shift drawn from U(-t, t) as a fraction of the image side, per axis.
        brightness: added offset drawn from U(-b, b).
        contrast: factor drawn from U(1 - c, 1 + c), around each image's mean.
        hflip: flip left-right with probability 0.5 (off: anatomy is not symmetric).
        randaugment: also apply the RandAugment-style policy.
        randaugment_ops: operations per sample.
        randaugment_magnitude: strength 0..10 of each operation.
    """

    rotation_deg: float = 7.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    brightness: float = 0.1
    contrast: float = 0.1
    hflip: bool = False
    randaugment: bool = False
    randaugment_ops: int = 2
    randaugment_magnitude: int = 5

    def __post_init__(self) -> None:
        # Accept a list (from JSON/YAML) and keep the config hashable.
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if min(self.rotation_deg, self.translate, self.brightness, self.contrast) < 0:
            raise ValueError("augmentation magnitudes must be >= 0")
        if not 0 <= self.randaugment_magnitude <= 10:
            raise ValueError("randaugment_magnitude must lie in 0..10")
        if not 0 <= self.randaugment_ops <= len(RANDAUGMENT_OPS):
            raise ValueError(f"randaugment_ops must lie in 0..{len(RANDAUGMENT_OPS)}")


def _uniform(n: int, lo: float, hi: float, like: Tensor, gen: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, device=like.device, dtype=like.dtype, generator=gen)


def _randaugment(x: Tensor, cfg: AugmentConfig, gen: torch.Generator | None
                 ) -> tuple[Tensor, Tensor]:
    """Choose ops per sample; returns (chosen (B, K) bool, signed magnitudes (B, K))."""
    b, k = x.shape[0], len(RANDAUGMENT_OPS)
    scores = torch.rand(b, k, device=x.device, generator=gen)
    chosen = torch.zeros(b, k, dtype=torch.bool, device=x.device)
    chosen.scatter_(1, scores.argsort(dim=1)[:, : cfg.randaugment_ops], True)
    sign = torch.where(torch.rand(b, k, device=x.device, generator=gen) < 0.5, -1.0, 1.0)
    strength = cfg.randaugment_magnitude / 10.0
    mags = torch.tensor([_MAX.get(op, 0.0) for op in RANDAUGMENT_OPS], device=x.device)
    return chosen, (sign * mags * strength * chosen).to(x.dtype)


def _affine(x: Tensor, cfg: AugmentConfig, ra: Tensor | None, gen: torch.Generator | None
            ) -> Tensor | None:
    """(B, 2, 3) output->input sampling matrices, or None when geometry is the identity."""
    lo, hi = cfg.scale
    plain = cfg.rotation_deg == 0 and lo == hi == 1 and cfg.translate == 0 and not cfg.hflip
    if plain and ra is None:
        return None
    b = x.shape[0]
    op = {name: (ra[:, j] if ra is not None else torch.zeros(b, device=x.device, dtype=x.dtype))
          for j, name in enumerate(RANDAUGMENT_OPS)}
    angle = _uniform(b, -cfg.rotation_deg, cfg.rotation_deg, x, gen) + op["rotate"]
    angle = angle * (math.pi / 180.0)
    zoom = _uniform(b, lo, hi, x, gen)
    # grid coordinates span [-1, 1], so a shift of a fraction f of the side is 2 f.
    tx = 2 * (_uniform(b, -cfg.translate, cfg.translate, x, gen) + op["translate_x"])
    ty = 2 * (_uniform(b, -cfg.translate, cfg.translate, x, gen) + op["translate_y"])
    flip = torch.ones(b, device=x.device, dtype=x.dtype)
    if cfg.hflip:
        heads = torch.rand(b, device=x.device, generator=gen) < 0.5
        flip = torch.where(heads, -1.0, 1.0).to(x.dtype)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # Rotation/zoom, then shear, then flip of the sampled x coordinate.  # (B, 2, 2)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    ones, zeros = torch.ones_like(cos), torch.zeros_like(cos)
    shear = torch.stack([torch.stack([ones, op["shear_x"]], -1),
                         torch.stack([op["shear_y"], ones], -1)], -2)
    lin = rot @ shear
    lin = lin * torch.stack([flip, ones], -1)[..., None]
    return torch.cat([lin, torch.stack([tx, ty], -1)[..., None]], -1)  # (B, 2, 3)


def _per_image_mean(x: Tensor) -> Tensor:
    return x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)


def _intensity_ops(x: Tensor, chosen: Tensor, mag: Tensor, gen: torch.Generator | None) -> Tensor:
    """Apply the chosen intensity ops of the RandAugment policy, each where selected."""
    col = {name: j for j, name in enumerate(RANDAUGMENT_OPS)}

    def where(name: str, y: Tensor) -> Tensor:
        return torch.where(chosen[:, col[name], None, None, None], y, x)

    def m(name: str) -> Tensor:
        return mag[:, col[name], None, None, None]  # (B, 1, 1, 1)

    x = where("brightness", x + m("brightness"))
    x = where("contrast", (x - _per_image_mean(x)) * (1 + m("contrast")) + _per_image_mean(x))
    x = where("gamma", x.clamp(1e-6, 1).pow(torch.exp(m("gamma"))))
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = where("sharpness", (x + m("sharpness") * (x - blur)).clamp(0, 1))
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = where("autocontrast", (x - lo) / (hi - lo).clamp_min(1e-6))
    levels = 2.0 ** (8 - m("posterize").abs().round())  # 8 bits minus 0..4
    x = where("posterize", torch.floor(x * (levels - 1) + 0.5) / (levels - 1))
    x = where("solarize", torch.where(x >= 1 - m("solarize").abs() / 2, 1 - x, x))
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=gen)
    return where("noise", x + m("noise").abs() * noise)


def augment_batch(x: Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
                  ) -> Tensor:
    """Randomly perturb a batch of grayscale images, each sample independently.

    Args:
        x: (B, 1, S, S) floating images in [0, 1] (any device).
        cfg: the augmentation strengths.
        generator: a ``torch.Generator`` on ``x``'s device for reproducible draws; None
            uses the global generator (seeded per DataLoader worker by PyTorch).

    Returns:
        (B, 1, S, S) images of ``x``'s dtype, clamped to [0, 1]. With every magnitude zero
        (and no flip or RandAugment) the output equals the input.
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, S, S) batch, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return x
    chosen = mag = None
    if cfg.randaugment and cfg.randaugment_ops > 0:
        chosen, mag = _randaugment(x, cfg, generator)
    theta = _affine(x, cfg, mag, generator)
    if theta is not None:
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, S, S, 2)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    b = x.shape[0]
    if cfg.contrast > 0:
        c = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, x, generator)[:, None, None, None]
        mean = _per_image_mean(x)
        x = (x - mean) * c + mean
    if cfg.brightness > 0:
        x = x + _uniform(b, -cfg.brightness, cfg.brightness, x, generator)[:, None, None, None]
    if chosen is not None:
        x = _intensity_ops(x, chosen, mag, generator)
    return x.clamp(0.0, 1.0)
