"""``lungvit runs`` and the job options of ``lungvit train``, on a store filled by hand."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from lungvit.cli.main import build_parser, main
from lungvit.training.config import TrainConfig
from lungvit.training.jobs.request import JobError
from lungvit.training.jobs.runner import request_from_cli
from lungvit.cli.runs_cmd import take_job_options
from lungvit.training.store import JobStatus, open_store


@pytest.fixture
def filled(tmp_path: Path) -> tuple[str, int, int, Path]:
    """A succeeded job with metrics, two checkpoints and a final model; a queued one."""
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"final model")
    ckpt = tmp_path / "step4.ckpt"
    ckpt.write_bytes(b"resumable")
    with open_store(url) as store:
        done = store.create_job({"train": {"data": "/scans/a"}, "workers": 2}, name="first")
        store.start_attempt(done, resolved_config={}, run_dir=str(tmp_path))
        for step in (1, 2, 3, 4):
            store.record_metrics(done, step, {"train/loss": 2.0 - step / 10})
        store.record_metrics(done, 4, {"val/loss": 1.7})
        store.record_checkpoint(done, version=4, path=str(ckpt), sha256="a" * 64,
                                metric_name="val/loss", metric_value=1.7, is_best=True)
        store.record_checkpoint(done, version=5, path=str(model), sha256="b" * 64,
                                metric_name="val/loss", metric_value=1.6, is_best=True)
        store.set_result(done, str(model), {"test/acc": 0.75, "val/loss": 1.6})
        store.set_status(done, "succeeded")
        queued = store.create_job({"train": {"data": "/scans/b"}})
    return url, done, queued, model


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(filled, capsys) -> None:
    url, done, queued, _ = filled
    code, out, _ = run(capsys, "runs", "list", "--db", url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "NAME", "STATUS", "ATTEMPT"]
    assert lines[2].split()[:4] == [str(queued), "-", "queued", "0"]  # newest first
    assert lines[3].split()[:4] == [str(done), "first", "succeeded", "1"]
    assert "0.75" in lines[3] and "/scans/a" in lines[3]
    code, out, _ = run(capsys, "runs", "list", "--status", "queued", "--db", url)
    assert len(out.splitlines()) == 3


def test_show(filled, capsys) -> None:
    url, done, _, model = filled
    code, out, _ = run(capsys, "runs", "show", str(done), "--db", url)
    assert code == 0
    assert out.startswith(f"job {done} (first): succeeded, attempt 1")
    assert f"model:            {model}" in out
    assert '"data": "/scans/a"' in out  # the request
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("train/loss"))
    assert row == ["train/loss", "4", "4", "1.6", "1.6"]  # points, last step, last, best
    assert "test/acc" in out  # final metrics
    ckpt_rows = [line.split() for line in out.splitlines() if "step4.ckpt" in line
                 or line.rstrip().endswith("model.safetensors")]
    assert [r[:2] for r in ckpt_rows[-2:]] == [["4", "1.7"], ["5", "1.6"]]
    assert "checkpoint v5 saved" in out  # the latest events


def test_compare(filled, capsys) -> None:
    url, done, queued, _ = filled
    code, out, _ = run(capsys, "runs", "compare", str(done), str(queued), "--db", url)
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows == {"test/acc": ["0.75", "-", "-"], "val/loss": ["1.6", "-", "-"]}


def test_promote_the_final_model_or_a_version(filled, capsys) -> None:
    url, done, _, model = filled
    code, out, _ = run(capsys, "runs", "promote", str(done), "--db", url)
    assert (code, out.strip()) == (0, str(model))
    code, out, _ = run(capsys, "runs", "promote", str(done), "--version", "4", "--db", url)
    assert code == 0 and out.strip().endswith("step4.ckpt")
    with open_store(url) as store:
        assert [c.promoted for c in store.checkpoints(done)] == [True, False]
    code, _, err = run(capsys, "runs", "promote", str(done), "--version", "9", "--db", url)
    assert code == 3 and "no checkpoint version 9" in err


def test_cancel_and_resume(filled, capsys) -> None:
    url, done, queued, _ = filled
    code, out, _ = run(capsys, "runs", "cancel", str(queued), "--db", url)
    assert (code, out.strip()) == (0, f"job {queued}: cancelled")
    code, out, _ = run(capsys, "runs", "cancel", str(done), "--db", url)
    assert "already succeeded" in out
    code, _, err = run(capsys, "runs", "resume", str(done), "--db", url)
    assert code == 3 and "only an interrupted job can be resumed" in err
    code, _, err = run(capsys, "runs", "show", "99", "--db", url)
    assert code == 3 and "no job 99" in err
    with open_store(url) as store:
        assert store.get_job(queued).status is JobStatus.CANCELLED


def _train_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "--data", "d", "--out", "m.safetensors", *extra])


def test_train_job_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = _train_args("--workers", "2", "--gpu", "--max-failures", "0", "--db", "sqlite://")
    opts = take_job_options(args)
    assert (opts.workers, opts.gpu, opts.max_failures, opts.db) == (2, True, 0, "sqlite://")
    assert not hasattr(args, "workers") and args.data == "d"  # the rest is the TrainConfig
    assert take_job_options(_train_args()) is None
    assert take_job_options(_train_args("--no-ray")) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert take_job_options(_train_args()).workers is None  # runs on that cluster
    monkeypatch.delenv("RAY_ADDRESS")
    in_process = take_job_options(_train_args("--in-process"))
    assert in_process.in_process and in_process.workers is None
    request = request_from_cli(TrainConfig(data="/scans", out="/m.safetensors"), in_process)
    assert (request.runtime, request.workers) == ("in-process", 1)
    with pytest.raises(JobError, match="workers=1 and no ray_address"):
        request_from_cli(TrainConfig(data="/scans", out="/m.safetensors"),
                         take_job_options(_train_args("--in-process", "--workers", "2")))
    for contradiction in (("--max-failures", "2"), ("--workers", "2", "--no-ray"),
                          ("--in-process", "--no-ray")):
        with pytest.raises(SystemExit) as exc:
            take_job_options(_train_args(*contradiction))
        assert exc.value.code == 2


def test_request_from_cli_options() -> None:
    cfg = TrainConfig(data="/scans", out="/m.safetensors", epochs=2)
    opts = argparse.Namespace(workers=3, gpu=True, cpus_per_worker=4.0, ray_address=None,
                              max_failures=2, db=None, mlflow=None, no_ray=None,
                              in_process=None)
    request = request_from_cli(cfg, opts)
    assert (request.workers, request.use_gpu, request.cpus_per_worker,
            request.max_failures) == (3, True, 4.0, 2)
    assert request.train == cfg.to_dict()


def test_cli_start_imports_no_heavy_module() -> None:
    code = ("import sys\nimport lungvit.cli.runs_cmd, lungvit.cli.train_cmd\n"
            "heavy = [m for m in ('ray', 'torch', 'lightning', 'sqlalchemy') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
