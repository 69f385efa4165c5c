"""Jobs under faults, on real Ray (CPU, 2 workers): a dead worker, a killed job, a cancel.

Each test starts Ray and trains (minutes on a 2-core machine), so they are marked slow:
``pytest -m slow tests/training/jobs``. Jobs are started the way the app starts them (a
detached process per job); every process of a job's session is killed when a test ends.
The faults come from :mod:`.fault_hooks`, which the job processes (and so their Ray
workers) can import: its folder is on the ``PYTHONPATH`` they are started with.
"""
from __future__ import annotations

import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from lungvit.training.jobs import runner as jobs
from lungvit.training.store import JobStatus, open_store

from . import fault_hooks
from .conftest import (STEPS_PER_EPOCH, expected_metric_keys, ray_workers, session_processes,
                       train_request, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
HEARTBEAT_S = 1.0


@pytest.fixture(autouse=True)
def _no_outside_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _fault_hooks_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job processes started here (and their Ray workers) can import the fault hooks."""
    for name, value in fault_hooks.environment().items():
        monkeypatch.setenv(name, value)


def faults(**args: int) -> dict[str, object]:
    """The job request settings that inject these faults (see :mod:`.fault_hooks`)."""
    return {"worker_hooks": fault_hooks.MODULE, "worker_hooks_args": args}


def start(request: dict, url: str, sessions: list[int]) -> tuple[int, object]:
    job_id = jobs.create_job(request, db_url=url)
    proc = jobs.start_job_process(job_id, db_url=url, heartbeat_s=HEARTBEAT_S)
    sessions.append(proc.pid)
    return job_id, proc


def metric_rows(url: str, job_id: int) -> list[tuple[int, str, int]]:
    """(step, name, attempt) of every metric row, read with plain sqlite3."""
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return db.execute("SELECT step, name, attempt FROM metrics WHERE job_id = ?",
                          (job_id,)).fetchall()


def test_a_worker_killed_once_and_the_job_completes_as_attempt_2(
        db_url: str, png_data: Path, cache_dir: Path, sessions: list[int]) -> None:
    epochs = 3
    job_id, proc = start(train_request(png_data, cache_dir, epochs=epochs,
                                       **faults(rank=1, step=6)),
                         db_url, sessions)
    assert proc.wait(timeout=800) == 0
    with open_store(db_url) as store:
        job = store.get_job(job_id)
        messages = [e.message for e in store.events(job_id)]
    assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 2), job.error_text
    assert any(m.startswith("worker rank") and "failed" in m for m in messages)
    assert "continuing from checkpoint checkpoint_step00000004" in messages
    rows = metric_rows(db_url, job_id)
    keys = [(step, name) for step, name, _ in rows]
    steps = epochs * STEPS_PER_EPOCH
    assert len(keys) == len(set(keys)) and set(keys) == expected_metric_keys(steps)
    # Steps up to the checkpoint were written once; the rest again by attempt 2.
    assert {(s, a) for s, _, a in rows} == {(s, 1 if s <= 4 else 2) for s in range(1, steps + 1)}
    assert session_processes(proc.pid) == {}


def test_with_max_failures_0_a_dead_worker_fails_the_job(
        db_url: str, png_data: Path, cache_dir: Path, sessions: list[int]) -> None:
    job_id, proc = start(train_request(png_data, cache_dir, epochs=3, max_failures=0,
                                       **faults(rank=1, step=6)),
                         db_url, sessions)
    assert proc.wait(timeout=800) == 3
    with open_store(db_url) as store:
        job = store.get_job(job_id)
    assert (job.status, job.attempt) == (JobStatus.FAILED, 1)
    assert "worker" in job.error_text.lower() and "fail" in job.error_text.lower()
    assert job.result_checkpoint_path is None
    assert session_processes(proc.pid) == {}


def test_a_killed_job_is_recovered_and_resumed_from_its_last_checkpoint(
        db_url: str, png_data: Path, cache_dir: Path, sessions: list[int]) -> None:
    epochs = 20
    # The job process and rank 0 are SIGKILLed right after the first checkpoint is stored:
    # anything of that step the store still lacked would be lost to the resume.
    first = STEPS_PER_EPOCH
    job_id, proc = start(train_request(png_data, cache_dir, epochs=epochs,
                                       **faults(kill_job_at_checkpoint=first)),
                         db_url, sessions)
    assert proc.wait(timeout=600) == -signal.SIGKILL
    with open_store(db_url) as store:
        assert [c.version for c in store.checkpoints(job_id)][:1] == [first]
        # Ray's processes share the job's fate: its workers go with it.
        wait_for(lambda: not ray_workers(proc.pid), 30, "Ray workers to exit")
        killed_at = max(s for s, _, _ in metric_rows(db_url, job_id))
        assert store.get_job(job_id).status is JobStatus.RUNNING  # nobody noticed yet
        time.sleep(2.5)
        left = _session_left(proc.pid)  # Ray's agents outlive the job's process
        assert jobs.recover_interrupted(db_url, stale_after_s=2.0) == [job_id]  # app start
        assert store.get_job(job_id).status is JobStatus.INTERRUPTED
        assert _session_left(proc.pid) == [], f"left: {left}; still running after recovery"

        resumed = jobs.resume_job(job_id, db_url=db_url, heartbeat_s=HEARTBEAT_S)
        sessions.append(resumed.pid)
        assert resumed.wait(timeout=800) == 0
        job = store.get_job(job_id)
        messages = [e.message for e in store.events(job_id)]
    assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 2), job.error_text
    starts = [int(m.group(1)) for m in map(
        re.compile(r"continuing from checkpoint checkpoint_step(\d+)").fullmatch, messages)
        if m]
    assert (starts, killed_at) == ([first], first)  # from the last checkpoint stored
    steps = epochs * STEPS_PER_EPOCH
    assert job.final_metrics["steps"] == steps  # the step count continued
    keys = [(s, n) for s, n, _ in metric_rows(db_url, job_id)]
    assert len(keys) == len(set(keys)) and set(keys) == expected_metric_keys(steps)
    assert session_processes(resumed.pid) == {}


def _session_left(pid: int) -> list[int]:
    """The processes of the Ray cluster that job process ``pid`` started still running."""
    from lungvit.training.jobs.ray_sessions import session_dirs
    from lungvit.training.jobs.ray_sessions import session_processes as of_session

    return [p for d in session_dirs(pid) for p in of_session(d)]


def test_cancel_stops_the_job_within_10_s_and_leaves_no_worker(
        db_url: str, png_data: Path, cache_dir: Path, sessions: list[int]) -> None:
    job_id, proc = start(train_request(png_data, cache_dir, epochs=500), db_url, sessions)
    with open_store(db_url) as store:
        wait_for(lambda: store.metrics(job_id, names=["train/loss"]), 600, "training steps")
        assert ray_workers(proc.pid)
        asked = time.monotonic()
        assert store.request_cancel(job_id) is JobStatus.RUNNING
        wait_for(lambda: store.get_job(job_id).status is JobStatus.CANCELLED, 10,
                 "the job to be cancelled", interval=0.1)
        took = time.monotonic() - asked
        assert ray_workers(proc.pid) == {}, f"workers left {took:.1f} s after the cancel"
        assert proc.wait(timeout=60) == 1
        assert store.get_job(job_id).result_checkpoint_path is None
    assert session_processes(proc.pid) == {}
