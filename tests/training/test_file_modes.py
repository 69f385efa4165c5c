"""What ``lungvit`` writes is its owner's only (700/600) whatever the umask."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from lungvit.cli.main import main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_store_and_data_directory_are_owner_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usual_umask: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("LUNGVIT_HOME", str(home))
    assert main(["runs", "list"]) == 0
    assert _mode(home) == 0o700 and _mode(home / "lungvit.db") == 0o600
    assert os.umask(0o022) == 0o022  # the command gave the umask back
    old = tmp_path / "old"  # as an older version left it
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    monkeypatch.setenv("LUNGVIT_HOME", str(old))
    assert main(["runs", "list"]) == 0
    assert _mode(old) == 0o700


def test_run_folder_and_model_are_owner_only(tmp_path: Path, usual_umask: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for label in ("lung-normal", "lung-covid"):
        (data / label).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (16, 16), 10 + 20 * i + (label == "lung-covid") * 5).save(
                data / label / f"{i}.png")
    run, out = tmp_path / "run", tmp_path / "models" / "m.safetensors"
    code = main(["train", "--data", str(data), "--out", str(out), "--run-dir", str(run),
                 "--variant", "lungvit_tiny", "--input-size", "32", "--patience", "0",
                 "--epochs", "1", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err[-2000:]
    written = [p for p in (run, out.parent, tmp_path / "cache") for p in [p, *p.rglob("*")]]
    assert (run / "config.yaml") in written and out in written
    assert any(p.suffix == ".ckpt" for p in written)
    loose = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in written
             if _mode(p) & 0o077}
    assert not loose, loose
