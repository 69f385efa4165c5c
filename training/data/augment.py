"""Batched, vectorised data augmentation for grayscale scans in [0, 1].

One random affine per sample (rotation, scale, translation, optional horizontal flip)
applied with a single ``affine_grid`` + ``grid_sample`` for the whole batch, then random
brightness and contrast. Horizontal flips are off by default: a chest X-ray's left and
right are not interchangeable (heart, situs). The optional RandAugment-style policy picks
``randaugment_ops`` operations per sample from :data:`RANDAUGMENT_OPS` at a fixed
magnitude (0..10) with random sign; geometric ones fold into the same affine, so there is
still one resampling per batch.

The acquisition ops (off by default; :data:`PRESETS` ``"acquisition"`` turns them on) imitate
what differs between scanners and sites: a random resized crop (zoom plus aspect change,
folded into the same affine), gamma, Gaussian blur, noise, down- then up-sampling, JPEG
re-compression and letterbox borders. They are drawn per sample; the per-sample ones that
cannot be batched (blur width, resampling factor, JPEG quality) loop over the batch.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

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
        aspect: log aspect-ratio change drawn from U(-a, a) (with ``scale``: a random
            resized crop, or a squashed/letterboxed export).
        gamma: gamma exp(U(-g, g)) on [0, 1] intensities (display LUTs differ by site).
        blur_prob, blur_sigma: Gaussian blur with sigma U(0.3, blur_sigma) px, per sample
            with probability ``blur_prob``.
        noise: additive Gaussian noise with standard deviation U(0, noise).
        resample_prob, resample_min: down-sample by U(resample_min, 1) and back up
            (a scan exported at low resolution), with probability ``resample_prob``.
        jpeg_prob, jpeg_quality: JPEG re-compression at quality U(lo, hi).
        border_prob, border_max: black or white borders (letterbox, collimation) of up to
            ``border_max`` of the side on one or both axes.
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
    aspect: float = 0.0
    gamma: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: float = 1.5
    noise: float = 0.0
    resample_prob: float = 0.0
    resample_min: float = 0.35
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (30, 90)
    border_prob: float = 0.0
    border_max: float = 0.12

    def __post_init__(self) -> None:
        # Accept a list (from JSON/YAML) and keep the config hashable.
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "jpeg_quality", tuple(int(v) for v in self.jpeg_quality))
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if min(self.rotation_deg, self.translate, self.brightness, self.contrast, self.aspect,
               self.gamma, self.blur_sigma, self.noise, self.border_max) < 0:
            raise ValueError("augmentation magnitudes must be >= 0")
        for name in ("blur_prob", "resample_prob", "jpeg_prob", "border_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], not {getattr(self, name)!r}")
        qlo, qhi = self.jpeg_quality
        if not 1 <= qlo <= qhi <= 100:
            raise ValueError(f"jpeg_quality must be (low, high) within 1..100, got "
                             f"{self.jpeg_quality}")
        if not 0 < self.resample_min <= 1:
            raise ValueError(f"resample_min must lie in (0, 1], not {self.resample_min!r}")
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
    plain = (cfg.rotation_deg == 0 and lo == hi == 1 and cfg.translate == 0 and not cfg.hflip
             and cfg.aspect == 0)
    if plain and ra is None:
        return None
    b = x.shape[0]
    op = {name: (ra[:, j] if ra is not None else torch.zeros(b, device=x.device, dtype=x.dtype))
          for j, name in enumerate(RANDAUGMENT_OPS)}
    angle = _uniform(b, -cfg.rotation_deg, cfg.rotation_deg, x, gen) + op["rotate"]
    angle = angle * (math.pi / 180.0)
    zoom = _uniform(b, lo, hi, x, gen)
    stretch = torch.exp(_uniform(b, -cfg.aspect, cfg.aspect, x, gen) / 2)  # (B,)
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
    ones = torch.ones_like(cos)
    shear = torch.stack([torch.stack([ones, op["shear_x"]], -1),
                         torch.stack([op["shear_y"], ones], -1)], -2)
    lin = rot @ shear
    # Aspect change: sampled x stretched, y shrunk by the same factor (area kept).
    lin = lin * torch.stack([flip * stretch, 1 / stretch], -1)[..., None]
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


def _coin(b: int, p: float, like: Tensor, gen: torch.Generator | None) -> Tensor:
    return torch.rand(b, device=like.device, generator=gen) < p  # (B,) bool


def _borders(x: Tensor, cfg: AugmentConfig, gen: torch.Generator | None) -> Tensor:
    """Black or white bands on both ends of one axis, per sample with ``border_prob``."""
    b, _, h, w = x.shape
    hit = _coin(b, cfg.border_prob, x, gen)
    if not bool(hit.any()):
        return x
    frac = _uniform(b, 0, cfg.border_max, x, gen)
    vertical = _coin(b, 0.5, x, gen)
    white = _coin(b, 0.3, x, gen).to(x.dtype)[:, None, None, None]
    rows = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None] / h  # (1, H, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :] / w  # (1, 1, W)
    f = frac[:, None, None]
    band_rows = (rows < f) | (rows >= 1 - f)  # (B, H, 1)
    band_cols = (cols < f) | (cols >= 1 - f)  # (B, 1, W)
    band = torch.where(vertical[:, None, None], band_rows.expand(b, h, w),
                       band_cols.expand(b, h, w))
    band = band & hit[:, None, None]
    return torch.where(band[:, None], white.expand_as(x), x)


def _jpeg_roundtrip(xi: Tensor, quality: int) -> Tensor:
    """(1, H, W) in [0, 1] -> 8-bit JPEG at ``quality`` (Pillow) -> back, same device/dtype."""
    raw = (xi[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (H, W)
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, format="JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), dtype=np.float32)
    return torch.from_numpy(back / 255.0)[None].to(xi.device, xi.dtype)


def _per_sample_ops(x: Tensor, cfg: AugmentConfig, gen: torch.Generator | None) -> Tensor:
    """Blur, down/up-sampling and JPEG re-compression: per-sample parameters, so a loop."""
    b, _, h, w = x.shape
    blur = _coin(b, cfg.blur_prob, x, gen) if cfg.blur_prob > 0 else None
    resample = _coin(b, cfg.resample_prob, x, gen) if cfg.resample_prob > 0 else None
    jpeg = _coin(b, cfg.jpeg_prob, x, gen) if cfg.jpeg_prob > 0 else None
    u = torch.rand(b, 3, generator=gen, device=x.device).cpu()  # (B, 3) one draw per op
    out = []
    for i in range(b):
        xi = x[i]  # (1, H, W)
        if resample is not None and resample[i]:
            f = cfg.resample_min + (1 - cfg.resample_min) * float(u[i, 0])
            small = (max(4, round(h * f)), max(4, round(w * f)))
            xi = F.interpolate(xi[None], size=small, mode="area")
            xi = F.interpolate(xi, size=(h, w), mode="bilinear", align_corners=False)[0]
        if blur is not None and blur[i]:
            sigma = 0.3 + max(0.0, cfg.blur_sigma - 0.3) * float(u[i, 1])
            k = 2 * math.ceil(2 * sigma) + 1
            xi = gaussian_blur(xi, kernel_size=[k, k], sigma=[sigma, sigma])
        if jpeg is not None and jpeg[i]:
            lo, hi = cfg.jpeg_quality
            q = int(round(lo + (hi - lo) * float(u[i, 2])))
            xi = _jpeg_roundtrip(xi, q)
        out.append(xi)
    return torch.stack(out)


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
    if cfg.gamma > 0:
        g = torch.exp(_uniform(b, -cfg.gamma, cfg.gamma, x, generator))[:, None, None, None]
        x = x.clamp(1e-6, 1).pow(g)
    if cfg.border_prob > 0:
        x = _borders(x.clamp(0, 1), cfg, generator)
    if cfg.blur_prob > 0 or cfg.resample_prob > 0 or cfg.jpeg_prob > 0:
        x = _per_sample_ops(x.clamp(0, 1), cfg, generator)
    if cfg.noise > 0:
        sd = _uniform(b, 0, cfg.noise, x, generator)[:, None, None, None]
        x = x + sd * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x.clamp(0.0, 1.0)


# Named policies for ``TrainConfig.augment_policy``; ``augment_options`` override fields.
PRESETS: dict[str, AugmentConfig] = {
    "basic": AugmentConfig(),
    # Other scanners and sites: crops and aspect changes, display curves, sharpness,
    # noise, resolution, compression and borders (each per sample, most at p < 0.5 so a
    # batch still holds clean-looking scans).
    "acquisition": AugmentConfig(
        rotation_deg=10.0, scale=(0.85, 1.25), translate=0.08, brightness=0.1, contrast=0.2,
        aspect=0.25, gamma=0.35, blur_prob=0.25, blur_sigma=1.5, noise=0.03,
        resample_prob=0.3, resample_min=0.35, jpeg_prob=0.3, jpeg_quality=(30, 90),
        border_prob=0.2, border_max=0.12),
}


def augment_config(policy: str = "basic", **overrides: object) -> AugmentConfig:
    """The :data:`PRESETS` entry ``policy`` with ``overrides`` applied.

    Raises:
        ValueError: unknown policy or field.
    """
    if policy not in PRESETS:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose one of "
                         f"{', '.join(PRESETS)}")
    known = {f.name for f in fields(AugmentConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown augmentation option(s) {', '.join(unknown)}")
    return replace(PRESETS[policy], **overrides)
