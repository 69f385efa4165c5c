"""The job life cycle without Ray: requests, folders, recovery, refusals, the watcher."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from lungvit.training.jobs import execute
from lungvit.training.jobs import request as request_mod
from lungvit.training.jobs import runner as jobs
from lungvit.training.config import TrainConfig
from lungvit.training.jobs.runner import JobError, JobRequest
from lungvit.training.store import JobNotFoundError, JobStatus, open_store


def test_request_round_trip_and_validation() -> None:
    request = JobRequest(train={"data": "/scans", "epochs": 3}, workers=2, max_failures=0)
    assert JobRequest.from_dict(request.to_dict()) == request
    with pytest.raises(JobError, match="unknown job request keys: colour"):
        JobRequest.from_dict({**request.to_dict(), "colour": "red"})
    with pytest.raises(JobError) as err:
        JobRequest(train={"epochs": 3, "bogus": 1}, workers=0, max_failures=-1).validate()
    for problem in ("train.data", "bogus", "workers", "max_failures"):
        assert problem in str(err.value)


def test_worker_resources_and_local_cpus() -> None:
    cpu = JobRequest(train={"data": "d"}, workers=2)
    assert cpu.worker_resources() == {"CPU": 1.0}
    assert cpu.local_cpus() == 3  # two workers and the driver
    gpu = JobRequest(train={"data": "d"}, workers=4, use_gpu=True, cpus_per_worker=2,
                     resources_per_worker={"accelerator_type:H100": 0.01})
    assert gpu.worker_resources() == {"CPU": 2.0, "GPU": 1.0, "accelerator_type:H100": 0.01}
    assert JobRequest(train={"data": "d"}, num_cpus=16).local_cpus() == 16


def test_job_folders(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'lungvit.db'}"
    request = JobRequest(train={"data": "/scans"}, use_gpu=True)
    assert request_mod.job_run_dir(7, request, url) == tmp_path / "db" / "runs" / "job-7"
    cfg = request_mod.train_config(7, request, url)
    assert isinstance(cfg, TrainConfig)
    assert Path(cfg.out) == tmp_path / "db" / "runs" / "job-7" / request_mod.MODEL_NAME
    assert cfg.accelerator == "gpu"  # precision "auto" then picks a GPU precision
    given = JobRequest(train={"data": "/scans", "run_dir": str(tmp_path / "r"),
                              "out": str(tmp_path / "m.safetensors")})
    cfg = request_mod.train_config(7, given, url)
    assert (cfg.run_dir, cfg.out, cfg.accelerator) == (str(tmp_path / "r"),
                                                       str(tmp_path / "m.safetensors"), "cpu")


def test_expected_steps() -> None:
    cfg = TrainConfig(data="d", out="o", epochs=3, batch_size=8)
    assert execute._expected_steps(cfg, n_train=50, workers=2) == 12  # ceil(25 / 8) = 4 an epoch
    cfg.global_batch = 32  # 2 batches of 8 on each of 2 workers per step
    assert execute._expected_steps(cfg, n_train=50, workers=2) == 6
    cfg.max_steps = 5
    assert execute._expected_steps(cfg, n_train=50, workers=2) == 5


def test_create_job_validates_before_queueing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with pytest.raises(JobError, match="workers"):
        jobs.create_job({"train": {"data": "/scans"}, "workers": 0}, db_url=url)
    job_id = jobs.create_job({"train": {"data": "/scans"}, "workers": 2}, db_url=url,
                             name="first")
    with open_store(url) as store:
        job = store.get_job(job_id)
    assert (job.status, job.name, job.request_config["workers"]) == (JobStatus.QUEUED,
                                                                    "first", 2)


def test_cancel_job_cancels_queued_jobs_and_flags_running_ones(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    queued = jobs.create_job({"train": {"data": "/scans"}}, db_url=url)
    running = jobs.create_job({"train": {"data": "/scans"}}, db_url=url)
    with open_store(url) as store:
        store.start_attempt(running, resolved_config={}, pid=1, hostname="h")
    assert jobs.cancel_job(queued, db_url=url) is JobStatus.CANCELLED
    assert jobs.cancel_job(running, db_url=url) is JobStatus.RUNNING  # its process stops it
    with open_store(url) as store:
        assert store.is_cancel_requested(running)
        assert store.get_job(queued).status is JobStatus.CANCELLED


def test_promote_result_promotes_the_final_models_checkpoint(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    job_id = jobs.create_job({"train": {"data": "/scans"}}, db_url=url)
    assert jobs.promote_result(job_id, db_url=url) is None  # no final model yet
    with open_store(url) as store:
        for version in (4, 8):
            store.record_checkpoint(job_id, version=version, path=f"/r/v{version}",
                                    sha256="a" * 64)
        store.set_result(job_id, "/r/v8")
    assert jobs.promote_result(job_id, db_url=url).version == 8
    assert jobs.promote_checkpoint(job_id, 4, db_url=url).promoted
    with open_store(url) as store:
        store.set_result(job_id, "/r/unrecorded.safetensors")
        assert jobs.promote_result(job_id, db_url=url) is None
        assert [c.promoted for c in store.checkpoints(job_id)] == [True, False]  # unchanged
    with pytest.raises(JobNotFoundError, match="no checkpoint version 9"):
        jobs.promote_checkpoint(job_id, 9, db_url=url)
    with pytest.raises(JobNotFoundError, match="no job 99"):
        jobs.promote_result(99, db_url=url)


def test_recover_interrupted_marks_only_stale_running_jobs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with open_store(url) as store:
        stale = store.create_job({"train": {"data": "d"}})
        alive = store.create_job({"train": {"data": "d"}})
        queued = store.create_job({"train": {"data": "d"}})
        for job in (stale, alive):
            store.start_attempt(job, resolved_config={})
        time.sleep(1.2)
        store.heartbeat(alive)
        assert jobs.recover_interrupted(url, stale_after_s=1.0) == [stale]
        assert [store.get_job(j).status for j in (stale, alive, queued)] == [
            JobStatus.INTERRUPTED, JobStatus.RUNNING, JobStatus.QUEUED]


def test_resume_refuses_jobs_that_are_not_interrupted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    job_id = jobs.create_job({"train": {"data": "/scans"}}, db_url=url)
    with pytest.raises(JobError, match="only an interrupted job can be resumed"):
        jobs.resume_job(job_id, db_url=url)
    with pytest.raises(JobError, match="only a queued or interrupted job"):
        with open_store(url) as store:
            store.request_cancel(job_id)
        jobs.run_job(job_id, db_url=url)


def test_a_job_that_cannot_start_fails_with_its_reason(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    job_id = jobs.create_job({"train": {"data": str(tmp_path / "missing"), "epochs": 0}},
                             db_url=url)
    with pytest.raises(Exception):
        jobs.run_job(job_id, db_url=url)
    with open_store(url) as store:
        job = store.get_job(job_id)
    assert job.status is JobStatus.FAILED
    assert "epochs must be a positive integer" in job.error_text


def test_missing_mlflow_fails_with_the_install_command(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    job_id = jobs.create_job({"train": {"data": str(tmp_path)}, "mlflow_uri": "http://x"},
                             db_url=url)
    with pytest.raises(JobError, match="pip install mlflow"):
        jobs.run_job(job_id, db_url=url)
    with open_store(url) as store:
        assert "pip install mlflow" in store.get_job(job_id).error_text


class _Aborts:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_watcher_beats_reports_progress_and_obeys_cancel(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with open_store(url) as store:
        job_id = store.create_job({"train": {"data": "d"}})
        store.start_attempt(job_id, resolved_config={})
        store.record_metrics(job_id, 3, {"train/loss": 1.5})
        first_beat = store.get_job(job_id).heartbeat_at
        seen: list[tuple[int, int | None, dict[str, float]]] = []
        abort = _Aborts()
        watcher = execute._Watcher(store, job_id, 0.3, abort,
                                lambda *a: seen.append(a), total_steps=12)
        watcher.POLL_S = 0.1
        watcher.start()
        try:
            time.sleep(1.0)
            assert store.get_job(job_id).heartbeat_at > first_beat
            assert seen and seen[-1] == (3, 12, {"train/loss": 1.5})
            assert abort.calls == 0
            store.request_cancel(job_id)
            time.sleep(0.5)
        finally:
            watcher.stop()
    assert watcher.cancelled and abort.calls == 1


def test_watcher_stops_a_job_declared_dead_elsewhere(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with open_store(url) as store:
        job_id = store.create_job({"train": {"data": "d"}})
        store.start_attempt(job_id, resolved_config={})
        store.set_status(job_id, "interrupted")  # the app thought the process was dead
        abort = _Aborts()
        watcher = execute._Watcher(store, job_id, 0.1, abort, None, None)
        watcher.POLL_S = 0.05
        watcher.start()
        time.sleep(0.8)
        watcher.stop()
    assert watcher.lost and not watcher.cancelled and abort.calls == 1


def test_watcher_stops_a_job_resumed_by_another_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with open_store(url) as store:
        job_id = store.create_job({"train": {"data": "d"}})
        store.start_attempt(job_id, resolved_config={})  # this process
        store.set_status(job_id, "interrupted")
        store.start_attempt(job_id, resolved_config={}, pid=1, hostname="elsewhere")
        abort = _Aborts()
        watcher = execute._Watcher(store, job_id, 0.1, abort, None, None)
        watcher.POLL_S = 0.05
        watcher.start()
        time.sleep(0.8)
        watcher.stop()
        # This process neither beat for the job nor changed it; the other one runs it.
        job = store.get_job(job_id)
    assert watcher.lost and abort.calls == 1
    assert (job.status, job.attempt, job.pid) == (JobStatus.RUNNING, 2, 1)


def test_a_job_claimed_by_another_process_is_left_to_it(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with open_store(url) as store:
        job_id = store.create_job({"train": {"data": "d"}})

    def claim_too_late(store, job_id, request, url, heartbeat_s, progress, worker_logs,
                       seen_attempt):
        # Another process claims the job while this one prepares its data and Ray.
        store.start_attempt(job_id, resolved_config={}, pid=1, hostname="elsewhere")
        return store.start_attempt(job_id, resolved_config={}, expect_attempt=seen_attempt)

    monkeypatch.setattr(execute, "_run", claim_too_late)
    with pytest.raises(JobError, match="another process claimed it"):
        jobs.run_job(job_id, db_url=url)
    with open_store(url) as store:
        job = store.get_job(job_id)
        execute._fail(store, job_id, RuntimeError("a late error of this process"))
        assert store.get_job(job_id) == job  # not this process's to fail either
    assert (job.status, job.attempt, job.pid, job.error_text) == (
        JobStatus.RUNNING, 1, 1, None)
