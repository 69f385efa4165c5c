"""``lungvit train --resume`` and model loading refuse pickled code with LungViT's message."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

from lungvit.cli.main import main
from lungvit.core.errors import CheckpointError
from lungvit.core.model.reference import load_weights_only, read_training_checkpoint


class _Payload:
    """Unpickling this opens (creates) ``path``: code execution, if anything runs it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def _lungvit(capsys: pytest.CaptureFixture[str], *args: str | Path
             ) -> tuple[int, str, list[warnings.WarningMessage]]:
    """Run the ``lungvit`` command line here: (exit code, stderr, warnings it raised)."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([str(a) for a in args])
    return code, capsys.readouterr().err, list(caught)


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(a Lightning-like .ckpt with a payload, the same as a plain pickle, the marker)."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"x": _Payload(marker)}}, ckpt)
    plain = tmp_path / "evil.pth"
    plain.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=4))
    return ckpt, plain, marker


def test_train_resume_from_pickled_code_is_refused(
        evil: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    ckpt, plain, marker = evil
    for label in ("lung-normal", "lung-covid"):  # a dataset that trains: only --resume is bad
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(12):
            Image.new("L", (16, 16), 20 * i).save(tmp_path / "data" / label / f"{i}.png")
    for bad in (ckpt, plain):
        code, err, caught = _lungvit(capsys, "train", "--data", tmp_path / "data", "--out",
                                     tmp_path / "m.safetensors", "--resume", bad,
                                     "--epochs", "1", "--variant", "lungvit_tiny",
                                     "--cache-dir", tmp_path / "cache",
                                     "--run-dir", tmp_path / "run")
        assert code == 3, err[-2000:]
        err = err.strip()
        assert err.startswith("lungvit train:") and "never runs code" in err
        assert len(err.splitlines()) == 1 and "weights_only" not in err, err
        assert not caught, [str(w.message) for w in caught]
    assert not marker.exists()


def test_plain_pickle_model_leaves_only_lungvit_message(
        evil: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, plain, marker = evil
    scan = tmp_path / "x.png"
    scan.write_bytes(b"not an image")
    code, err, caught = _lungvit(capsys, "predict", "--model", plain, scan)
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "GLOBAL" in lines[0], lines
    assert not caught, [str(w.message) for w in caught]  # PyTorch's protocol warning
    assert not marker.exists()


def test_training_checkpoint_reader(evil: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ckpt, plain, marker = evil
    for bad in (ckpt, plain):
        with pytest.raises(CheckpointError, match="refused.*never runs code"):
            read_training_checkpoint(bad)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "epoch": 3,
                "callbacks": {"ModelCheckpoint": {"best_model_path": "x.ckpt"}}}, good)
    assert read_training_checkpoint(good)["epoch"] == 3
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        read_training_checkpoint(tmp_path / "weights.pt")
    assert load_weights_only("w", (tmp_path / "weights.pt").read_bytes())["w"].sum() == 2
    assert not marker.exists()
