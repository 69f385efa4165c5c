"""Self-describing checkpoints: round trip, atomic save, and refusing bad or unsafe files."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lungvit.core import __version__
from lungvit.core.model.checkpoint import (
    CheckpointInfo, Provenance, load_checkpoint, read_checkpoint_info, read_state_dict,
    save_checkpoint,
)
from lungvit.core.errors import CheckpointError
from lungvit.core.model.network import DEFAULT_LABELS, count_parameters, create_model
from lungvit.core.model.card import model_card
from lungvit.core.model.preprocess import PreprocessConfig


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("lungvit_tiny").eval()
    for m in model.modules():  # non-trivial BatchNorm statistics must survive the trip
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model


def _full_info(model: torch.nn.Module) -> CheckpointInfo:
    return CheckpointInfo(
        labels=DEFAULT_LABELS, preprocess=PreprocessConfig(64, 0.4, 0.3),
        model=model.lungvit_config, temperature=1.7,
        provenance=Provenance(
            dataset="synthetic phantoms, 90 images", class_counts={x: 10 for x in DEFAULT_LABELS},
            dataset_fingerprint="sha256:abc", epochs=3, train_time_s=123.4,
            gpu_type="NVIDIA H100", gpu_count=2, date="2025-01-02T03:04:05+00:00",
            lungvit_version="9.9", source=""),
        metrics={"accuracy": 0.5, "ece": 0.04,
                 "per_class": {x: {"precision": 0.5, "recall": 0.25} for x in DEFAULT_LABELS}},
        num_params=count_parameters(model), notes="demo model", intended_use="tests")


def _rewrite(src: Path, dst: Path, *, tensors=None, header=None) -> Path:
    """Copy a checkpoint, replacing tensors and/or editing its JSON header."""
    loaded = safetensors.torch.load(src.read_bytes())
    doc = json.loads(_metadata(src)["lungvit"])
    if header:
        header(doc)
    safetensors.torch.save_file({**loaded, **(tensors or {})}, dst,
                                metadata={"lungvit": json.dumps(doc)})
    return dst


def _metadata(path: Path) -> dict[str, str]:
    with safetensors.safe_open(path, "pt") as fh:
        return fh.metadata()


def test_round_trip_identical_outputs_and_info(tiny, tmp_path: Path) -> None:
    info = _full_info(tiny)
    path = save_checkpoint(tmp_path / "m.safetensors", tiny, info)
    model, loaded = load_checkpoint(path, map_location="cpu")
    assert loaded == info
    assert read_checkpoint_info(path) == info
    assert not model.training
    x = torch.randn(3, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), tiny(x), atol=0, rtol=0)
    assert json.loads(_metadata(path)["lungvit"])["format"] == "lungvit-checkpoint"


def test_save_fills_in_what_it_knows(tiny, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", tiny, CheckpointInfo())
    info = read_checkpoint_info(path)
    assert info.model == tiny.lungvit_config and info.variant == "lungvit_tiny"
    assert info.preprocess == PreprocessConfig(input_size=64, mean=0.5, std=0.5)
    assert info.num_params == count_parameters(tiny)
    assert info.provenance.lungvit_version == __version__ and info.provenance.date
    assert info.temperature == 1.0 and info.labels == DEFAULT_LABELS


def test_save_is_atomic(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", tiny, CheckpointInfo())
    assert os.listdir(tmp_path) == ["m.safetensors"]
    original = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tiny, CheckpointInfo(temperature=2.0))
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file left behind
    assert path.read_bytes() == original


def test_save_refuses_labels_that_do_not_fit_the_head(tmp_path: Path) -> None:
    model = create_model("lungvit_tiny", num_classes=5)
    with pytest.raises(CheckpointError,
                       match="head has 5 outputs but the checkpoint lists 9 labels"):
        save_checkpoint(tmp_path / "m.safetensors", model, CheckpointInfo())
    assert not list(tmp_path.iterdir())


class _Payload:
    """Unpickling this opens (creates) ``path``: code execution, if anything runs it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_unexecuted(tmp_path: Path) -> None:
    control = tmp_path / "control"  # a plain unpickler does run the payload
    pickle.loads(pickle.dumps(_Payload(control), protocol=2))
    assert control.exists()

    marker = tmp_path / "pwned"
    evil_pth, evil_pkl = tmp_path / "evil.pth", tmp_path / "evil.pkl"
    torch.save({"w": _Payload(marker)}, evil_pth)
    evil_pkl.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2))
    for path in (evil_pth, evil_pkl):
        for read in (load_checkpoint, read_state_dict, read_checkpoint_info):
            with pytest.raises(CheckpointError, match="refused.*GLOBAL.*never runs code"):
                read(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"", "is empty"),
    (lambda b: b[: len(b) // 2], "is truncated: its tensors need"),
    (lambda b: b[:100], "truncated or is not a safetensors file"),
    (lambda b: b"hello, this is a text file, not a model\n" * 3, "not a safetensors file"),
])
def test_damaged_files_are_refused(tiny, tmp_path: Path, damage, message: str) -> None:
    good = save_checkpoint(tmp_path / "m.safetensors", tiny, CheckpointInfo())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad)


def test_truncated_and_missing_pth_refused(tmp_path: Path) -> None:
    path = tmp_path / "ref.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or is not a PyTorch file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_safetensors_without_lungvit_header_refused(tiny, tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(dict(tiny.state_dict()), path)
    with pytest.raises(CheckpointError, match="without a LungViT header"):
        load_checkpoint(path)


def test_wrong_shape_refused(tiny, tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "m.safetensors", tiny, CheckpointInfo())
    bad = _rewrite(good, tmp_path / "bad.safetensors",
                   tensors={"blocks.1.mlp.fc1.weight": torch.zeros(100, 64)})
    with pytest.raises(CheckpointError, match=r"weight blocks.1.mlp.fc1.weight has shape "
                                              r"\(100, 64\), expected \(128, 64\)"):
        load_checkpoint(bad)


def test_wrong_label_count_refused(tiny, tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "m.safetensors", tiny, CheckpointInfo())
    fewer = _rewrite(good, tmp_path / "a.safetensors",
                     header=lambda d: d.update(labels=d["labels"][:5]))
    with pytest.raises(CheckpointError, match="head has 9 outputs but the checkpoint lists 5"):
        load_checkpoint(fewer)

    def five_classes(doc):  # config and labels agree on 5, the head weights hold 9
        doc["labels"] = doc["labels"][:5]
        doc["model"]["num_classes"] = 5
    head = _rewrite(good, tmp_path / "b.safetensors", header=five_classes)
    with pytest.raises(CheckpointError, match="head has 9 outputs but the checkpoint lists 5"):
        load_checkpoint(head)


def test_damaged_or_newer_header_refused(tiny, tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "m.safetensors", tiny, CheckpointInfo())
    newer = _rewrite(good, tmp_path / "n.safetensors", header=lambda d: d.update(format_version=99))
    with pytest.raises(CheckpointError, match="format 99.*upgrade LungViT"):
        load_checkpoint(newer)
    odd = _rewrite(good, tmp_path / "o.safetensors", header=lambda d: d["model"].update(act="tanh"))
    with pytest.raises(CheckpointError, match="damaged LungViT header.*act must be one of"):
        load_checkpoint(odd)


def test_model_card(tiny) -> None:
    card = model_card(_full_info(tiny))
    assert card.startswith("# LungViT model card: lungvit_tiny")
    assert "not for clinical use" in card
    assert f"Parameters: {count_parameters(tiny):,}" in card
    assert "| lung-covid | 0.5 | 0.25 |" in card and "| class | precision | recall |" in card
    assert "NVIDIA H100; GPUs: 2" in card and "Softmax temperature: 1.7" in card
    assert "Expected calibration error: 0.04" in card and "sha256:abc" in card
    assert "mean 0.4 and std 0.3" in card and "2 min 03 s" in card
    plain = model_card(CheckpointInfo(model=tiny.lungvit_config))
    assert "not for clinical use" not in plain and "No evaluation results" in plain
    nested = model_card(CheckpointInfo(metrics={  # as training writes them
        "val": {"acc": 0.75}, "test": {"acc": 0.5, "per_class": {"lung-covid": {"f1": None}}}}))
    assert "- val: acc 0.75" in nested and "Per class (test):" in nested
    assert "| lung-covid | n/a |" in nested


def test_a_header_length_starting_with_pickle_byte_still_loads(tmp_path: Path) -> None:
    """A safetensors header of 0x..80 bytes makes the file start with pickle's 0x80 byte."""
    torch.manual_seed(0)
    model = create_model("lungvit_tiny", num_classes=2, img_size=32)
    for k in range(300):  # the header grows 8 bytes at a time: 32 steps span 256
        info = CheckpointInfo(labels=("a", "b"), notes="x" * k)
        path = save_checkpoint(tmp_path / "m.safetensors", model, info)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no note length gave a 0x..80 header")
    loaded, info2 = load_checkpoint(path)
    assert info2.notes == "x" * k
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
