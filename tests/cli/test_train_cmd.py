"""``lungvit train``: options, reports, exit codes, and a cheap import at CLI start."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from lungvit.core.model.checkpoint import read_checkpoint_info
from lungvit.cli.main import build_parser, main
from lungvit.cli.train_cmd import config_from_args


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_options_map_onto_the_training_config() -> None:
    cfg = config_from_args(_parse(
        "--data", "d", "--out", "m.safetensors", "--from", "base.safetensors", "--epochs", "3",
        "--max-steps", "50", "--batch-size", "16", "--global-batch", "64", "--lr", "5e-4",
        "--input-size", "48", "--label-smoothing", "0.1", "--class-weighting",
        "--grad-checkpointing", "--val-every", "10", "--checkpoint-every", "20",
        "--freeze-stem-epochs", "1", "--seed", "7", "--loader-workers", "2", "--run-dir", "r",
        "--resume", "r/checkpoints/last.ckpt", "--fast-dev-run", "--devices", "0,1",
        "--no-augment", "--patience", "0"))
    assert (cfg.data, cfg.out, cfg.from_checkpoint) == ("d", "m.safetensors", "base.safetensors")
    assert (cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.global_batch) == (3, 50, 16, 64)
    assert (cfg.lr, cfg.input_size, cfg.label_smoothing) == (5e-4, 48, 0.1)
    assert cfg.class_weighting and cfg.grad_checkpointing and cfg.fast_dev_run
    assert (cfg.val_every_n_steps, cfg.checkpoint_every_n_steps) == (10, 20)
    assert (cfg.freeze_stem_epochs, cfg.seed, cfg.num_workers) == (1, 7, 2)
    assert (cfg.run_dir, cfg.resume_from) == ("r", "r/checkpoints/last.ckpt")
    assert cfg.devices == [0, 1] and cfg.augment is False and cfg.early_stopping_patience == 0
    # Options left out keep the dataclass defaults.
    plain = config_from_args(_parse("--data", "d", "--out", "m"))
    assert (plain.epochs, plain.lr, plain.augment, plain.variant) == (10, 1e-3, True, None)
    assert (plain.transfer, plain.compare_to) == ("auto", None)
    tuned = config_from_args(_parse("--data", "d", "--out", "m", "--transfer", "llrd",
                                    "--compare-to", "other.safetensors"))
    assert (tuned.transfer, tuned.compare_to) == ("llrd", "other.safetensors")
    with pytest.raises(SystemExit):
        _parse("--data", "d", "--out", "m", "--transfer", "everything")


def test_the_command_module_imports_cheaply() -> None:
    code = ("import sys, lungvit.cli.train_cmd as c; "
            "heavy = [m for m in ('torch', 'lightning', 'timm') if m in sys.modules]; "
            "assert not heavy, heavy; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_help_names_every_option() -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "lungvit"), "train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--data", "--out", "--variant", "--from", "--epochs", "--max-steps",
                   "--global-batch", "--class-weighting", "--grad-checkpointing",
                   "--val-every", "--checkpoint-every", "--freeze-stem-epochs",
                   "--loader-workers", "--run-dir", "--resume", "--fast-dev-run",
                   "--transfer", "--compare-to"):
        assert option in out.stdout, option
    from lungvit.core.model.network import DEFAULT_VARIANT  # the help names the real default
    assert f"default: {DEFAULT_VARIANT}" in " ".join(out.stdout.split())


def test_bad_settings_exit_3_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.safetensors"),
                 "--batch-size", "0", "--run-dir", str(tmp_path / "r")]) == 3
    assert "batch_size must be a positive integer" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "m.safetensors"), "--run-dir", str(tmp_path / "r"),
                 "--cache-dir", str(tmp_path / "c")]) == 3
    assert "missing" in capsys.readouterr().err


def test_a_folder_with_corrupt_files_trains_and_reports_them(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    assert main(["demo-data", str(data), "--per-class", "5", "--size", "48", "--seed", "3"]) == 0
    (data / "lung-covid" / "torn.png").write_bytes(
        (data / "lung-normal").glob("*.png").__next__().read_bytes()[:200])  # truncated
    (data / "lung-normal" / "notes.png").write_text("not an image")
    (data / "lung-opacity" / "empty.dcm").write_bytes(b"")
    (data / "lung-rare").mkdir()
    (data / "lung-rare" / "one.png").write_bytes(next((data / "lung-covid").glob("*-1.png"))
                                                 .read_bytes())
    capsys.readouterr()
    out_model = tmp_path / "model.safetensors"
    code = main(["train", "--data", str(data), "--out", str(out_model), "--variant",
                 "lungvit_tiny", "--input-size", "32", "--epochs", "1", "--batch-size", "16",
                 "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # trained, but some input could not be used
    out = captured.out
    assert "unreadable: 3 file(s) skipped" in out
    for name in ("lung-covid/torn.png", "lung-normal/notes.png", "lung-opacity/empty.dcm"):
        assert name in out
    assert "left out: class lung-rare has only 1 readable image(s)" in out
    for heading in ("class", "train", "val", "test", "precision", "recall", "f1", "auc"):
        assert heading in out
    assert "calibration: temperature" in out and f"model: {out_model}" in out
    assert "3 unreadable file(s) were skipped" in captured.err
    info = read_checkpoint_info(out_model)
    assert "lung-rare" not in info.labels and len(info.labels) == 9
    assert info.metrics["data"]["unreadable"] == 3
    assert sum(info.provenance.class_counts.values()) > 0
