"""The reference design, re-implemented from DESIGN.md: the model users' ``.pth`` files fit.

A plain module with exactly the reference state-dict names (vit-pytorch style ``PreNorm`` /
``Attention`` / ``FeedForward``) and explicit ``softmax(q k^T / sqrt(d)) v`` attention. LungViT
serves the timm model (:mod:`lungvit.core.model.network`); this model exists so the importer
(:mod:`lungvit.core.model.reference`) can be tested against an independent implementation and so
benchmarks have the figures to beat. Tests and benchmarks only.
"""
from __future__ import annotations

import torch
from torch import nn

from lungvit.core.model.reference import STEM_CHANNELS, STEM_STRIDES

__all__ = ["ReferenceViT"]


class FlattenTokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C), row-major (einops ``b c h w -> b (h w) c``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class PreNorm(nn.Module):
    """LayerNorm, then ``fn`` (residual added by the caller)."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear -> Dropout (keys ``net.0`` and ``net.3``)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ReferenceAttention(nn.Module):
    """Multi-head self-attention with ``heads * dim_head`` inner width and no qkv bias."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # (B, N, 3*H*D) -> three (B, H, N, D)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)  # (B, H, N, N)
        out = self.attn_drop(attn) @ v  # (B, H, N, D)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, dim)


class Transformer(nn.Module):
    """``depth`` pre-LN blocks: ``layers[i][0]`` attention, ``layers[i][1]`` MLP."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(dim, ReferenceAttention(dim, heads, dim_head, dropout)),
                           PreNorm(dim, FeedForward(dim, mlp_dim, dropout))])
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class ReferenceViT(nn.Module):
    """The reference design's conv-stem ViT (defaults: the reference configuration).

    Args:
        image_size: input side in pixels (the stem divides it by 4).
        num_classes: outputs of the head.
        dim, depth, heads, dim_head, mlp_dim: encoder shape.
        channels: input channels.
        dropout: MLP / attention dropout; emb_dropout: dropout after the positional embedding.
    """

    def __init__(self, *, image_size: int = 64, num_classes: int = 9, dim: int = 64,
                 depth: int = 16, heads: int = 16, dim_head: int = 64, mlp_dim: int = 256,
                 channels: int = 1, dropout: float = 0.0, emb_dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        in_chans = channels
        for out_chans, stride in zip(STEM_CHANNELS, STEM_STRIDES, strict=True):
            layers += [nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1),
                       nn.BatchNorm2d(out_chans), nn.ReLU()]
            in_chans = out_chans
        self.conv_stem = nn.Sequential(*layers)
        self.to_patch_embedding = nn.Sequential(FlattenTokens(), nn.Linear(in_chans, dim))
        num_patches = (image_size // 4) ** 2
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(self.conv_stem(img))  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embedding[:, : x.shape[1] + 1]
        x = self.transformer(self.dropout(x))
        return self.mlp_head(x[:, 0])  # (B, num_classes)
