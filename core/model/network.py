"""The LungViT model: timm's ``VisionTransformer`` with a convolutional stem as its embedding.

The stem (3x3 conv + BatchNorm + ReLU, repeated) is the backbone of timm's own
:class:`~timm.layers.HybridEmbed`, whose 1x1 projection is the reference design's
``Linear(128 -> dim)`` on the row-major flattened feature map. Attention is timm's
:class:`~timm.layers.Attention` with an explicit head width, so ``heads x head_dim`` may
differ from the stream width (the reference: 16 x 64 = 1024 on a 64-wide stream).

Importing this module registers every variant with timm, so after
``import lungvit.core.model.network`` the call ``timm.create_model("lungvit_ref64", num_classes=9)``
works. No variant has downloadable weights: ``pretrained=True`` raises; LungViT models come
from checkpoint files (:mod:`lungvit.core.model.checkpoint`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import cache, partial
from typing import Any

from timm.layers import Attention, HybridEmbed, LayerNorm
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lungvit.core.configs import unknown_keys
from lungvit.core.errors import CheckpointError

__all__ = [
    "DEFAULT_LABELS", "DEFAULT_VARIANT", "VARIANTS", "ConvStem", "ConvStemEmbed", "ModelConfig",
    "attention_with_head_dim", "build_model", "count_parameters", "create_model",
    "set_fused_attention", "stem_output_size",
]

# The nine classes of the reference design, in its (alphabetical) order. A checkpoint
# carries its own list; this is only the default for imported reference files.
DEFAULT_LABELS: tuple[str, ...] = (
    "lung-covid", "lung-normal", "lung-oct-cnv", "lung-oct-dme", "lung-oct-drusen",
    "lung-oct-normal", "lung-opacity", "lung-tuberculosis", "lung-viral-pneumonia",
)

# nn.LayerNorm's default eps, as in the reference design (timm's own default is 1e-6).
LAYER_NORM_EPS = 1e-5

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def stem_output_size(side: int, strides: tuple[int, ...]) -> int:
    """Side of the feature map a stem of 3x3, padding-1 convs with ``strides`` makes."""
    for stride in strides:
        side = (side + 2 - 3) // stride + 1
    return side


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a LungViT model (stored in every checkpoint).

    Args:
        name: variant name (informational once stored; the fields below rebuild the model).
        img_size: side of the square input in pixels.
        in_chans: input channels (1: grayscale).
        stem_channels: output channels of each 3x3 conv of the stem.
        stem_strides: stride of each stem conv; their product is the token stride.
        embed_dim: width of the token stream.
        depth: number of pre-LayerNorm transformer blocks.
        num_heads: attention heads per block.
        head_dim: width of each head (``num_heads * head_dim`` need not equal ``embed_dim``).
        mlp_dim: hidden width of each block's MLP.
        act: MLP activation, "relu" or "gelu".
        qkv_bias: whether the q/k/v projection has a bias (the reference has none).
        proj_drop_rate: dropout after the MLP activation and after each projection
            (the reference design's ``dropout``).
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth rate (linearly increasing over the blocks).
        drop_rate: dropout before the classifier head (timm's meaning of ``drop_rate``).
        num_classes: number of outputs of the head.
    """

    name: str = "custom"
    img_size: int = 64
    in_chans: int = 1
    stem_channels: tuple[int, ...] = (64, 64, 128, 128)
    stem_strides: tuple[int, ...] = (1, 1, 2, 2)
    embed_dim: int = 64
    depth: int = 16
    num_heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 256
    act: str = "relu"
    qkv_bias: bool = False
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    num_classes: int = 9

    def __post_init__(self) -> None:
        object.__setattr__(self, "stem_channels", tuple(int(c) for c in self.stem_channels))
        object.__setattr__(self, "stem_strides", tuple(int(s) for s in self.stem_strides))
        problems = []
        if len(self.stem_channels) != len(self.stem_strides) or not self.stem_channels:
            problems.append("stem_channels and stem_strides must be non-empty and of equal length")
        if self.act not in _ACTIVATIONS:
            problems.append(f"act must be one of {sorted(_ACTIVATIONS)}, not {self.act!r}")
        for field in ("img_size", "in_chans", "embed_dim", "depth", "num_heads", "head_dim",
                      "mlp_dim", "num_classes"):
            if int(getattr(self, field)) < 1:
                problems.append(f"{field} must be positive, not {getattr(self, field)!r}")
        if problems:
            raise ValueError("invalid model configuration: " + "; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid (rows, cols) the stem makes of an ``img_size`` input."""
        side = stem_output_size(self.img_size, self.stem_strides)
        return side, side

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stem_channels"] = list(self.stem_channels)
        data["stem_strides"] = list(self.stem_strides)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild a config; unknown keys are an error (they would be silently ignored)."""
        unknown = unknown_keys(cls, data)
        if unknown:
            raise ValueError(f"unknown model configuration keys: {', '.join(unknown)}")
        return cls(**data)


VARIANTS: dict[str, ModelConfig] = {
    # Exactly the reference design: 5,014,089 parameters with 9 classes.
    "lungvit_ref64": ModelConfig(name="lungvit_ref64"),
    # A very small model for tests and CI (64 px, 4 blocks of 4 x 16-wide heads).
    "lungvit_tiny": ModelConfig(
        name="lungvit_tiny", stem_channels=(16, 16, 32, 32), embed_dim=64, depth=4,
        num_heads=4, head_dim=16, mlp_dim=128, act="gelu", qkv_bias=True),
    # 128 px: one more stride-2 conv (stride 8) so the grid is again 16 x 16 tokens; the
    # full-resolution conv is narrow and the compute goes to a wider, shallower encoder
    # (192 wide, 3 x 64-wide heads) instead of 1024-wide attention on a 64-wide stream.
    "lungvit_s128": ModelConfig(
        name="lungvit_s128", img_size=128, stem_channels=(16, 32, 64, 128, 192),
        stem_strides=(1, 2, 2, 2, 1), embed_dim=192, depth=10, num_heads=3, head_dim=64,
        mlp_dim=768, act="gelu", qkv_bias=True),
    # 224 px: stride-16 stem, a 14 x 14 grid, the same encoder as lungvit_s128.
    "lungvit_s224": ModelConfig(
        name="lungvit_s224", img_size=224, stem_channels=(16, 32, 64, 128, 192, 192),
        stem_strides=(1, 2, 2, 2, 2, 1), embed_dim=192, depth=10, num_heads=3, head_dim=64,
        mlp_dim=768, act="gelu", qkv_bias=True),
    # Real radiographs at 128 / 224 px for about the cost of lungvit_tiny at 64: a
    # stride-8 (stride-16) stem of early stride-2 convs makes a 16 x 16 (14 x 14) grid,
    # encoded by 6 blocks 96 wide (3 x 32-wide heads).
    "lungvit_t128": ModelConfig(
        name="lungvit_t128", img_size=128, stem_channels=(16, 32, 64, 96),
        stem_strides=(2, 2, 2, 1), embed_dim=96, depth=6, num_heads=3, head_dim=32,
        mlp_dim=384, act="gelu", qkv_bias=True),
    "lungvit_t224": ModelConfig(
        name="lungvit_t224", img_size=224, stem_channels=(16, 32, 64, 96, 96),
        stem_strides=(2, 2, 2, 2, 1), embed_dim=96, depth=6, num_heads=3, head_dim=32,
        mlp_dim=384, act="gelu", qkv_bias=True),
}

# Chosen by measurement (bench/bench_variants.py -> bench/RESULTS-variants.md): every variant
# trained on the same phantoms with the same 450-CPU-second budget; lungvit_tiny reached 84%
# test accuracy on all nine classes, the 5 M-parameter variants 20-24% (2-5 epochs in that
# budget), and it is also the fastest per scan. It is what `lungvit train` builds when no
# variant or base model is named, and the phantom demo model's variant. The bundled real-data
# model is lungvit_t224 (chosen on real scans: bench/RESULTS-realdata-variants.md); training a
# new model on real scans, name it (--variant lungvit_t224) or fine-tune from the bundled one.
DEFAULT_VARIANT = "lungvit_tiny"


class ConvStem(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) repeated; indices 0, 1 / 3, 4 / ... as in the reference."""

    def __init__(self, in_chans: int, channels: tuple[int, ...], strides: tuple[int, ...]):
        layers: list[nn.Module] = []
        for out_chans, stride in zip(channels, strides, strict=True):
            layers += [nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1),
                       nn.BatchNorm2d(out_chans), nn.ReLU()]
            in_chans = out_chans
        super().__init__(*layers)
        self.num_features = channels[-1]  # read by HybridEmbed


class ConvStemEmbed(HybridEmbed):
    """timm's ``HybridEmbed`` around a :class:`ConvStem`, with a 1x1 projection to tokens.

    Built by ``VisionTransformer`` through ``embed_layer``; the grid is computed from the
    conv arithmetic instead of a dummy forward pass.
    """

    def __init__(self, img_size: int | tuple[int, int] = 64, patch_size: int = 1,
                 in_chans: int = 1, embed_dim: int = 64, *,
                 stem_channels: tuple[int, ...], stem_strides: tuple[int, ...],
                 **kwargs: Any) -> None:
        stem = ConvStem(in_chans, stem_channels, stem_strides)
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        total_stride = math.prod(stem_strides)
        super().__init__(backbone=stem, img_size=size, patch_size=patch_size,
                         feature_size=tuple(stem_output_size(s, stem_strides) for s in size),
                         feature_ratio=(total_stride, total_stride), in_chans=in_chans,
                         embed_dim=embed_dim, **kwargs)


@cache
def attention_with_head_dim(head_dim: int) -> type[Attention]:
    """timm ``Attention`` with a fixed head width, usable as ``VisionTransformer(attn_layer=)``.

    ``VisionTransformer`` needs a class here (it calls ``issubclass``), so a
    ``functools.partial`` will not do. The class is named ``AttentionHd{head_dim}`` and is
    found again by this module's ``__getattr__``, so whole models still pickle.
    """

    def __init__(self: Attention, dim: int, num_heads: int = 8, **kwargs: Any) -> None:
        kwargs.pop("attn_head_dim", None)
        Attention.__init__(self, dim, num_heads=num_heads, attn_head_dim=head_dim, **kwargs)

    name = f"AttentionHd{head_dim}"
    return type(name, (Attention,), {"__init__": __init__, "__module__": __name__,
                                     "__qualname__": name})


def __getattr__(name: str) -> Any:
    match = re.fullmatch(r"AttentionHd(\d+)", name)
    if match:
        return attention_with_head_dim(int(match.group(1)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(cfg: ModelConfig) -> VisionTransformer:
    """Build a randomly initialised model from a config.

    Returns:
        timm's ``VisionTransformer``, with the config kept as ``model.lungvit_config``.
    """
    model = VisionTransformer(
        img_size=cfg.img_size, patch_size=1, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, global_pool="token", embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.embed_dim,
        qkv_bias=cfg.qkv_bias, class_token=True, no_embed_class=False, final_norm=True,
        fc_norm=False, drop_rate=cfg.drop_rate, proj_drop_rate=cfg.proj_drop_rate,
        attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
        embed_layer=partial(ConvStemEmbed, stem_channels=cfg.stem_channels,
                            stem_strides=cfg.stem_strides),
        norm_layer=partial(LayerNorm, eps=LAYER_NORM_EPS), act_layer=_ACTIVATIONS[cfg.act],
        attn_layer=attention_with_head_dim(cfg.head_dim),
    )
    hidden = model.blocks[0].mlp.fc1.out_features
    if hidden != cfg.mlp_dim:  # int(dim * ratio) rounding; never for the shipped variants
        raise ValueError(f"mlp_dim {cfg.mlp_dim} cannot be expressed as a ratio of "
                         f"embed_dim {cfg.embed_dim} (timm built {hidden})")
    model.lungvit_config = cfg
    model.pretrained_cfg = model.default_cfg = {
        "architecture": cfg.name, "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size),
        "num_classes": cfg.num_classes, "first_conv": "patch_embed.backbone.0",
        "classifier": "head", "interpolation": "bilinear", "crop_pct": 1.0,
    }
    return model


def create_model(variant: str, *, num_classes: int = 9, **overrides: Any) -> VisionTransformer:
    """Build a named variant, optionally overriding :class:`ModelConfig` fields.

    Args:
        variant: a key of :data:`VARIANTS`.
        num_classes: outputs of the head.
        **overrides: other :class:`ModelConfig` fields (e.g. ``drop_path_rate=0.1``).

    Returns:
        The model (training mode, random weights).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown LungViT variant {variant!r}; choose one of "
                         f"{', '.join(VARIANTS)}")
    known = {f.name for f in fields(ModelConfig)} - {"name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{variant}: unsupported arguments {', '.join(unknown)}; "
                        f"LungViT variants accept {', '.join(sorted(known))}")
    return build_model(replace(VARIANTS[variant], num_classes=num_classes, **overrides))


def _timm_entrypoint(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise CheckpointError(
            f"{variant} has no downloadable pretrained weights; load a LungViT checkpoint "
            "with lungvit.core.model.checkpoint.load_checkpoint(path) instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm plumbing
        kwargs.pop(key, None)
    return create_model(variant, **kwargs)


@register_model
def lungvit_ref64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The reference design: 64 px, conv stem to 16x16 tokens, 16 blocks of 16 x 64-wide heads."""
    return _timm_entrypoint("lungvit_ref64", pretrained, **kwargs)


@register_model
def lungvit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A very small 64 px LungViT for tests and CI."""
    return _timm_entrypoint("lungvit_tiny", pretrained, **kwargs)


@register_model
def lungvit_s128(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """128 px, stride-8 stem to 16x16 tokens, 10 blocks 192 wide."""
    return _timm_entrypoint("lungvit_s128", pretrained, **kwargs)


@register_model
def lungvit_s224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """224 px, stride-16 stem to 14x14 tokens, 10 blocks 192 wide."""
    return _timm_entrypoint("lungvit_s224", pretrained, **kwargs)


@register_model
def lungvit_t128(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """128 px, stride-8 stem to 16x16 tokens, 6 blocks 96 wide."""
    return _timm_entrypoint("lungvit_t128", pretrained, **kwargs)


@register_model
def lungvit_t224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """224 px, stride-16 stem to 14x14 tokens, 6 blocks 96 wide."""
    return _timm_entrypoint("lungvit_t224", pretrained, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (learnable tensors only; BatchNorm running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def set_fused_attention(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Switch every timm ``Attention``'s fused (SDPA) path on or off, restoring it on exit.

    With ``enabled=False`` each block computes ``softmax(q k^T)`` explicitly and passes it
    through ``attn.attn_drop``, where a forward hook can read the attention weights.
    """
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    previous = [m.fused_attn for m in modules]
    try:
        for m in modules:
            m.fused_attn = enabled
        yield model
    finally:
        for m, was in zip(modules, previous, strict=True):
            m.fused_attn = was
