"""Importing reference-design state dicts: exact equivalence, and the CLI around it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lungvit.core.model.checkpoint import import_reference, load_checkpoint
from lungvit.cli.main import main
from lungvit.core.errors import CheckpointError
from lungvit.core.model.network import DEFAULT_LABELS, VARIANTS, set_fused_attention
from lungvit.synthetic.reference_model import ReferenceViT

SMALL = dict(dim=32, depth=2, heads=4, dim_head=16, mlp_dim=48)


def _reference(seed: int = 0, **kwargs) -> ReferenceViT:
    """A reference module with random weights, including non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    ref = ReferenceViT(**kwargs)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(123)
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return ref.eval()


def _assert_same_logits(ref: torch.nn.Module, model: torch.nn.Module, size: int) -> None:
    x = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(x)
        for fused in (True, False):
            with set_fused_attention(model, fused):
                torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [64, 128])
def test_import_matches_reference_module(tmp_path: Path, size: int) -> None:
    ref = _reference(image_size=size, **SMALL)
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    model, info = import_reference(path, heads=4)
    cfg = info.model
    assert (cfg.img_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (
        size, 32, 2, 4, 16, 48)
    assert info.labels == DEFAULT_LABELS and info.preprocess.input_size == size
    assert not model.training
    _assert_same_logits(ref, model, size)


def test_import_full_reference_design(tmp_path: Path) -> None:
    ref = _reference()
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    model, info = load_checkpoint(path)  # reference .pth files load directly too
    assert info.model == VARIANTS["lungvit_ref64"] and info.num_params == 5_014_089
    assert "imported from reference-design ref.pth" in info.provenance.source
    _assert_same_logits(ref, model, 64)


def test_import_wrapped_state_dict(tmp_path: Path) -> None:
    """Lightning-style files: {"state_dict": {"model.<key>": ...}} among other entries."""
    ref = _reference(**SMALL)
    path = tmp_path / "wrapped.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in ref.state_dict().items()}},
               path)
    model, _ = import_reference(path, heads=4)
    _assert_same_logits(ref, model, 64)


def test_import_refusals(tmp_path: Path) -> None:
    sd = _reference(**SMALL).state_dict()
    with pytest.raises(CheckpointError, match="head has 9 outputs but 3 labels were given"):
        import_reference(sd, labels=["a", "b", "c"], heads=4)
    with pytest.raises(CheckpointError, match="which 5 heads do not divide"):
        import_reference(sd, heads=5)
    with pytest.raises(CheckpointError, match="a 96x96 input makes 24x24"):
        import_reference(sd, heads=4, img_size=96)
    with pytest.raises(CheckpointError, match="unexpected keys extra.weight"):
        import_reference({**sd, "extra.weight": torch.zeros(1)}, heads=4)
    with pytest.raises(CheckpointError, match="has no 'cls_token'"):
        import_reference({k: v for k, v in sd.items() if k != "cls_token"}, heads=4)
    with pytest.raises(CheckpointError, match=r"weight blocks.0.mlp.fc2.weight has shape"):
        import_reference({**sd, "transformer.layers.0.1.fn.net.3.weight": torch.zeros(32, 7)},
                         heads=4)


def test_cli_import_checkpoint_and_card(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = _reference(**SMALL, num_classes=3)
    src, out = tmp_path / "ref.pth", tmp_path / "model.safetensors"
    torch.save(ref.state_dict(), src)
    args = ["import-checkpoint", str(src), "--out", str(out), "--labels", "a,b,c", "--heads", "4"]
    assert main(args) == 0
    assert "3 classes (a, b, c)" in capsys.readouterr().out
    model, info = load_checkpoint(out)
    assert info.labels == ("a", "b", "c")
    _assert_same_logits(ref, model, 64)

    assert main(args) == 3  # refuses to overwrite
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    capsys.readouterr()

    assert main(["card", str(out)]) == 0
    card = capsys.readouterr().out
    assert card.startswith("# LungViT model card") and "2. `c`" in card

    assert main(["import-checkpoint", str(src), "--out", str(tmp_path / "x.safetensors")]) == 3
    err = capsys.readouterr().err
    assert "head has 3 outputs but 9 labels were given" in err and "Traceback" not in err
    assert main(["card", str(tmp_path / "missing.safetensors")]) == 3
    assert "does not exist" in capsys.readouterr().err
