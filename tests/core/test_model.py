"""The timm LungViT model: registration, shapes, gradients, fused/explicit attention."""
from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from timm.layers import Attention

from lungvit.core.errors import CheckpointError
from lungvit.core.model.network import (
    DEFAULT_LABELS, DEFAULT_VARIANT, VARIANTS, ModelConfig, count_parameters, create_model,
    set_fused_attention,
)

REFERENCE_PARAMS = 5_014_089  # DESIGN.md: the reference design without qkv bias


def _input(cfg: ModelConfig, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_timm_create_model_forward_shapes(variant: str) -> None:
    model = timm.create_model(variant, num_classes=9).eval()
    cfg = VARIANTS[variant]
    assert model.lungvit_config == cfg
    assert model.patch_embed.grid_size == cfg.grid_size
    assert model.pos_embed.shape == (1, cfg.grid_size[0] * cfg.grid_size[1] + 1, cfg.embed_dim)
    with torch.inference_mode():
        logits = model(_input(cfg))
    assert logits.shape == (2, 9)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradient_reaches_every_parameter(variant: str) -> None:
    torch.manual_seed(0)
    model = create_model(variant, num_classes=3).train()
    loss = torch.nn.functional.cross_entropy(model(_input(model.lungvit_config)),
                                             torch.tensor([0, 2]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_reference_variant_matches_design() -> None:
    model = timm.create_model("lungvit_ref64", num_classes=9)
    n = count_parameters(model)
    assert n == REFERENCE_PARAMS
    assert abs(n - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.01
    block = model.blocks[0]
    assert block.attn.num_heads == 16 and block.attn.head_dim == 64
    assert block.attn.qkv.weight.shape == (3 * 1024, 64) and block.attn.qkv.bias is None
    assert block.mlp.fc1.out_features == 256
    assert isinstance(block.mlp.act, torch.nn.ReLU)
    assert model.global_pool == "token" and model.num_prefix_tokens == 1
    # The only norm after the blocks is the final one, which plays the reference's mlp_head.0.
    assert isinstance(model.fc_norm, torch.nn.Identity)
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.norm.eps == 1e-5


@pytest.mark.parametrize("variant", ["lungvit_tiny", "lungvit_ref64"])
def test_fused_and_explicit_attention_agree(variant: str) -> None:
    torch.manual_seed(0)
    model = create_model(variant).eval()
    x = _input(model.lungvit_config)
    with torch.inference_mode():
        with set_fused_attention(model, True):
            fused = model(x)
        with set_fused_attention(model, False):
            explicit = model(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_set_fused_attention_restores_and_exposes_attention_weights() -> None:
    model = create_model("lungvit_tiny").eval()
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    attns[0].fused_attn = True
    attns[1].fused_attn = False
    before = [a.fused_attn for a in attns]
    captured: list[torch.Tensor] = []
    hook = attns[0].attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with pytest.raises(RuntimeError, match="boom"), set_fused_attention(model, False):
            assert not any(a.fused_attn for a in attns)
            with torch.inference_mode():
                model(_input(model.lungvit_config, batch=1))
            raise RuntimeError("boom")
    finally:
        hook.remove()
    assert [a.fused_attn for a in attns] == before
    (weights,) = captured
    n = 16 * 16 + 1
    assert weights.shape == (1, 4, n, n)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, n))


def test_pretrained_weights_are_refused() -> None:
    with pytest.raises(CheckpointError, match="no downloadable pretrained weights"):
        timm.create_model("lungvit_tiny", pretrained=True)


def test_create_model_rejects_unknown_names_and_arguments() -> None:
    with pytest.raises(ValueError, match="unknown LungViT variant"):
        create_model("lungvit_huge")
    with pytest.raises(TypeError, match="unsupported arguments global_pool"):
        timm.create_model("lungvit_tiny", global_pool="avg")
    model = timm.create_model("lungvit_tiny", num_classes=4, drop_path_rate=0.1)
    assert model.lungvit_config.num_classes == 4 and model.lungvit_config.drop_path_rate == 0.1


def test_model_config_round_trip_and_validation() -> None:
    for cfg in VARIANTS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model configuration keys: colour"):
        ModelConfig.from_dict({**VARIANTS["lungvit_tiny"].to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="act must be one of"):
        ModelConfig(act="swish")
    with pytest.raises(ValueError, match="equal length"):
        ModelConfig(stem_channels=(8, 8), stem_strides=(1,))


def test_models_copy_and_pickle() -> None:
    model = create_model("lungvit_tiny").eval()
    x = _input(model.lungvit_config)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.inference_mode():
            torch.testing.assert_close(clone(x), model(x))


def test_defaults() -> None:
    assert DEFAULT_VARIANT in VARIANTS
    assert DEFAULT_LABELS == tuple(sorted(DEFAULT_LABELS)) and len(DEFAULT_LABELS) == 9
