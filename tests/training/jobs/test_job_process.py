"""The job process (``python -m lungvit.cli.job_process``): its exit codes, and that the
job launcher starts it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lungvit.cli import exit_codes, job_process
from lungvit.training.jobs import request as request_mod
from lungvit.training.jobs import runner as jobs
from lungvit.training.store import JobStatus


@pytest.mark.parametrize(("status", "code"), [
    (JobStatus.SUCCEEDED, 0), (JobStatus.FAILED, 3), (JobStatus.CANCELLED, 1),
    (JobStatus.INTERRUPTED, 1)])
def test_exit_code_of_each_final_status(status: JobStatus, code: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert exit_codes.of_job(status) == code
    monkeypatch.setattr(job_process, "run_job", lambda job_id, **kw: status)
    assert job_process.main(["--job-id", "1", "--db", "sqlite://"]) == code


def test_exit_codes_when_the_job_cannot_run_or_is_interrupted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    assert job_process.main(["--job-id", "99", "--db", url]) == exit_codes.ERROR == 3
    assert "job 99: no job 99" in capsys.readouterr().err

    def interrupted(job_id: int, **kw: object) -> JobStatus:
        raise KeyboardInterrupt

    monkeypatch.setattr(job_process, "run_job", interrupted)
    assert job_process.main(["--job-id", "1", "--db", url]) == exit_codes.INTERRUPTED == 130


def test_the_launcher_starts_the_job_process(tmp_path: Path) -> None:
    """A cancelled job is refused by the process the launcher starts (before any Ray)."""
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    job_id = jobs.create_job({"train": {"data": str(tmp_path)}}, db_url=url)
    jobs.cancel_job(job_id, db_url=url)
    proc = jobs.start_job_process(job_id, db_url=url)
    assert proc.wait(timeout=120) == 3
    assert proc.args[:3] == [sys.executable, "-m", "lungvit.cli.job_process"]
    log = (request_mod.job_run_dir(job_id, jobs.JobRequest(train={"data": "d"}), url)
           / request_mod.LOG_NAME).read_text()
    assert f"job {job_id}: job {job_id} is cancelled; only a queued or interrupted job" in log


def test_help_names_the_module() -> None:
    out = subprocess.run([sys.executable, "-m", "lungvit.cli.job_process", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "python -m lungvit.cli.job_process" in out.stdout
