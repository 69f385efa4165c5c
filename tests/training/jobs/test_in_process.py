"""Jobs run in Ray Train's local mode: one worker in the job process, no Ray cluster.

The app's one-worker Fine-tune runs this way (``runtime="auto"``), so its first step comes
seconds after the button. These jobs run for real (Lightning, Ray Train's local mode, a
SQLite store) in detached job processes, as the app starts them; the two default tests take
about 30 s on 2 cores, the fault tests are marked slow.
"""
from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch

from lungvit.training.jobs import runner as jobs
from lungvit.training.jobs.ray_sessions import session_dirs
from lungvit.training.jobs.ray_report import (CHECKPOINT_FILE, LOCAL_SCORE_FILE, ReportToRay,
                                              checkpoint_dir_name)
from lungvit.training.jobs.request import IN_PROCESS, JobError, JobRequest
from lungvit.training.store import JobStatus, open_store

from . import fault_hooks
from .conftest import expected_metric_keys, session_processes, train_request, wait_for

HEARTBEAT_S = 1.0
STEPS_PER_EPOCH = 7  # 50 training images on one worker, batches of 8


@pytest.fixture(autouse=True)
def _no_outside_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in fault_hooks.environment().items():
        monkeypatch.setenv(name, value)


def in_process(data: Path, cache: Path, *, epochs: int, **job: object) -> dict:
    request = train_request(data, cache, epochs=epochs, **job)
    request["workers"] = 1
    request.setdefault("runtime", "in-process")
    return request


def start(request: dict, url: str, sessions: list[int]) -> tuple[int, object]:
    job_id = jobs.create_job(request, db_url=url)
    proc = jobs.start_job_process(job_id, db_url=url, heartbeat_s=HEARTBEAT_S)
    sessions.append(proc.pid)
    return job_id, proc


def test_an_in_process_job_trains_without_a_cluster_and_keeps_the_best_checkpoints(
        db_url: str, png_data: Path, cache_dir: Path, sessions: list[int]) -> None:
    epochs = 4
    request = in_process(png_data, cache_dir, epochs=epochs, runtime="auto")
    request["train"]["keep_best_k"] = 1
    job_id, proc = start(request, db_url, sessions)
    assert proc.wait(timeout=600) == 0
    with open_store(db_url) as store:
        job = store.get_job(job_id)
        messages = [e.message for e in store.events(job_id)]
        stored = store.checkpoints(job_id)
        series = store.metrics(job_id)
    assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 1), job.error_text
    assert job.ray_address == IN_PROCESS and job.hardware["in_process"] is True
    assert any(m.startswith("worker rank 0 in the job process (Ray Train local mode")
               for m in messages), messages
    assert session_dirs(proc.pid) == []  # no Ray cluster was started
    steps = epochs * STEPS_PER_EPOCH
    got = {(s, name) for name, points in series.items() for s, _ in points}
    assert got == expected_metric_keys(steps, STEPS_PER_EPOCH)
    # One resumable checkpoint per epoch, then the final model; on disk stay the newest
    # resumable one and the best one.
    assert [c.version for c in stored] == [STEPS_PER_EPOCH * e for e in range(1, epochs + 1)
                                           ] + [steps + 1]
    assert Path(stored[-1].path) == Path(job.result_checkpoint_path)
    folder = Path(job.run_dir) / "ray" / f"job-{job_id}"
    kept = sorted(p.name for p in folder.glob("checkpoint_step*"))
    losses = {c.version: c.metric_value for c in stored[:-1]}
    best = min(losses, key=losses.get)
    assert kept == sorted({checkpoint_dir_name(steps), checkpoint_dir_name(best)})
    for name in kept:
        ckpt = torch.load(folder / name / CHECKPOINT_FILE, map_location="cpu",
                          weights_only=False)
        assert ckpt["global_step"] == int(name.removeprefix("checkpoint_step"))
    assert Path(job.result_checkpoint_path).is_file()
    assert session_processes(proc.pid) == {}


def test_cancel_of_an_in_process_job_is_seen_within_3_s(
        db_url: str, png_data: Path, cache_dir: Path, sessions: list[int]) -> None:
    job_id, proc = start(in_process(png_data, cache_dir, epochs=500), db_url, sessions)
    with open_store(db_url) as store:
        wait_for(lambda: store.metrics(job_id, names=["train/loss"]), 300, "training steps")
        asked = time.monotonic()
        jobs.cancel_job(job_id, db_url=db_url)
        wait_for(lambda: store.get_job(job_id).status is JobStatus.CANCELLED, 3,
                 "the job to be cancelled within 3 s", interval=0.05)
        took = time.monotonic() - asked
        assert proc.wait(timeout=30) == 1, f"cancelled after {took:.1f} s"
        assert store.get_job(job_id).result_checkpoint_path is None
    assert session_processes(proc.pid) == {}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_error_in_training_restarts_it_once_from_the_latest_checkpoint(
        db_url: str, png_data: Path, cache_dir: Path, sessions: list[int]) -> None:
    epochs, fail_at = 3, STEPS_PER_EPOCH + 3
    job_id, proc = start(in_process(png_data, cache_dir, epochs=epochs,
                                    worker_hooks=fault_hooks.MODULE,
                                    worker_hooks_args={"raise_at_step": fail_at}),
                         db_url, sessions)
    assert proc.wait(timeout=800) == 0
    with open_store(db_url) as store:
        job = store.get_job(job_id)
        messages = [e.message for e in store.events(job_id)]
        series = store.metrics(job_id)
    assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 2), job.error_text
    assert any(m.startswith("worker rank 0 failed: RuntimeError: fault injection")
               for m in messages), messages
    assert f"continuing from checkpoint {checkpoint_dir_name(STEPS_PER_EPOCH)}" in messages
    steps = epochs * STEPS_PER_EPOCH
    got = {(s, name) for name, points in series.items() for s, _ in points}
    assert got == expected_metric_keys(steps, STEPS_PER_EPOCH)
    assert job.final_metrics["steps"] == steps


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_with_max_failures_0_an_error_fails_the_in_process_job(
        db_url: str, png_data: Path, cache_dir: Path, sessions: list[int]) -> None:
    job_id, proc = start(in_process(png_data, cache_dir, epochs=3, max_failures=0,
                                    worker_hooks=fault_hooks.MODULE,
                                    worker_hooks_args={"raise_at_step": 3}),
                         db_url, sessions)
    assert proc.wait(timeout=800) == 3
    with open_store(db_url) as store:
        job = store.get_job(job_id)
    assert (job.status, job.attempt) == (JobStatus.FAILED, 1)
    assert "fault injection: raised at step 3" in job.error_text
    assert job.result_checkpoint_path is None


def test_runtime_is_checked_and_auto_means_in_process_for_one_worker_without_a_cluster(
        ) -> None:
    base = {"data": "/scans"}
    assert JobRequest(train=base, runtime="auto").in_process(environ={})
    assert not JobRequest(train=base, runtime="auto").in_process(
        environ={"RAY_ADDRESS": "10.0.0.5:6379"})
    assert not JobRequest(train=base, runtime="auto", workers=2).in_process(environ={})
    assert not JobRequest(train=base, runtime="auto", ray_address="h:6379").in_process({})
    assert not JobRequest(train=base).in_process(environ={})  # the default: a cluster
    assert JobRequest(train=base, runtime="in-process").in_process(environ={})
    with pytest.raises(JobError, match="runtime must be one of"):
        JobRequest(train=base, runtime="laptop").validate()
    with pytest.raises(JobError, match="workers=1 and no ray_address"):
        JobRequest(train=base, runtime="in-process", workers=2).validate()
    # Requests stored before the setting existed read back as cluster jobs.
    old = JobRequest(train=base).to_dict()
    del old["runtime"]
    assert JobRequest.from_dict(old).runtime == "cluster"


def test_local_checkpoints_keep_the_newest_and_the_best_k(tmp_path: Path) -> None:
    report = ReportToRay(None, local_dir=tmp_path, keep_best_k=2)
    losses = {4: 0.9, 8: 0.5, 12: math.nan, 16: 0.7, 20: 0.8}
    for step, loss in losses.items():
        folder = tmp_path / checkpoint_dir_name(step)
        folder.mkdir()
        (folder / CHECKPOINT_FILE).write_bytes(b"x")
        (folder / LOCAL_SCORE_FILE).write_text(json.dumps({"val_loss": loss}))
        report._prune(keep=folder)
    stranger = tmp_path / "checkpoint_step_notes"  # not one of ours: left alone
    stranger.mkdir()
    report._prune(keep=tmp_path / checkpoint_dir_name(20))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([checkpoint_dir_name(8), checkpoint_dir_name(16),
                           checkpoint_dir_name(20), stranger.name])


def test_an_in_process_spec_has_one_worker() -> None:
    from lungvit.training.jobs.ray_train import TrainSpec

    with pytest.raises(ValueError, match="one worker"):
        TrainSpec(train_config={}, job_id=1, db_url="sqlite://", owner_pid=1,
                  owner_host="h", workers=2, in_process=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_in_process_job_is_recovered_and_resumed_in_process(
        db_url: str, png_data: Path, cache_dir: Path, sessions: list[int]) -> None:
    epochs = 3
    # The job process (which is also the worker here) is SIGKILLed right after the first
    # checkpoint is stored; the app's recovery marks it interrupted and a resume continues.
    job_id, proc = start(in_process(png_data, cache_dir, epochs=epochs,
                                    worker_hooks=fault_hooks.MODULE,
                                    worker_hooks_args={"kill_job_at_checkpoint":
                                                       STEPS_PER_EPOCH}),
                         db_url, sessions)
    assert proc.wait(timeout=600) == -signal.SIGKILL
    with open_store(db_url) as store:
        assert store.get_job(job_id).status is JobStatus.RUNNING  # nobody noticed yet
        time.sleep(2.5)
        assert jobs.recover_interrupted(db_url, stale_after_s=2.0) == [job_id]
        resumed = jobs.resume_job(job_id, db_url=db_url, heartbeat_s=HEARTBEAT_S)
        sessions.append(resumed.pid)
        assert resumed.wait(timeout=600) == 0
        job = store.get_job(job_id)
        messages = [e.message for e in store.events(job_id)]
        series = store.metrics(job_id)
    assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 2), job.error_text
    assert job.hardware["in_process"] is True and job.ray_address == IN_PROCESS
    assert f"continuing from checkpoint {checkpoint_dir_name(STEPS_PER_EPOCH)}" in messages
    steps = epochs * STEPS_PER_EPOCH
    got = {(s, name) for name, points in series.items() for s, _ in points}
    assert got == expected_metric_keys(steps, STEPS_PER_EPOCH)
    assert session_processes(resumed.pid) == {}
