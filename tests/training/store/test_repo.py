"""The store's operations, each checked against what is in the database afterwards (on
SQLite and on PostgreSQL)."""
from __future__ import annotations

import math
import pickle
from dataclasses import FrozenInstanceError
from datetime import timedelta

import numpy as np
import pytest

from lungvit.training.store import (TERMINAL, TRANSITIONS, AttemptConflictError,
                                    InvalidTransitionError, JobNotFoundError, JobStatus, Store,
                                    open_store)
from lungvit.training.store.schema import utcnow

from .conftest import scalar, sql


def _count(db_url: str, statement: str) -> int:
    return scalar(db_url, statement)


def _running(store: Store, **config: object) -> int:
    job = store.create_job(dict(config) or {"epochs": 1})
    store.start_attempt(job, resolved_config={"epochs": 1})
    return job


# --- jobs and their life cycle ------------------------------------------------------------

def test_create_and_get_job(store: Store) -> None:
    job_id = store.create_job({"data_dir": "/data/x", "epochs": 3}, name="first")
    job = store.get_job(job_id)
    assert (job.id, job.name, job.status, job.attempt) == (job_id, "first", "queued", 0)
    assert job.request_config == {"data_dir": "/data/x", "epochs": 3}
    assert not job.cancel_requested and not job.is_terminal
    with pytest.raises(FrozenInstanceError):
        job.status = JobStatus.RUNNING  # type: ignore[misc]
    with pytest.raises(JobNotFoundError, match="no job 999"):
        store.get_job(999)


def test_list_jobs_newest_first_and_by_status(store: Store) -> None:
    a, b, c = (store.create_job({"i": i}) for i in range(3))
    store.start_attempt(b, resolved_config={})
    assert [j.id for j in store.list_jobs()] == [c, b, a]
    assert [j.id for j in store.list_jobs("queued")] == [c, a]
    assert [j.id for j in store.list_jobs(["running", "failed"])] == [b]
    assert [j.id for j in store.list_jobs(limit=1)] == [c]


def test_start_attempt_records_where_and_how(store: Store) -> None:
    job_id = store.create_job({"epochs": 1})
    attempt = store.start_attempt(job_id, resolved_config={"epochs": 1, "lr": 1e-3},
                                  hardware={"gpus": 1}, ray_address="127.0.0.1:6379", pid=42,
                                  hostname="node1", run_dir="/runs/1", dataset_fingerprint="abc")
    job = store.get_job(job_id)
    assert attempt == job.attempt == 1
    assert job.status is JobStatus.RUNNING
    assert (job.pid, job.hostname, job.ray_address, job.run_dir, job.dataset_fingerprint) == (
        42, "node1", "127.0.0.1:6379", "/runs/1", "abc")
    assert job.resolved_config == {"epochs": 1, "lr": 1e-3} and job.hardware == {"gpus": 1}
    assert job.started_at is not None and job.heartbeat_at == job.started_at


def test_every_transition_is_checked(store: Store) -> None:
    """Walk each status to each other one; only the TRANSITIONS table's edges succeed."""
    def job_in(status: JobStatus) -> int:
        job = store.create_job({})
        if status is JobStatus.QUEUED:
            return job
        store.start_attempt(job, resolved_config={})
        if status is not JobStatus.RUNNING:
            store.set_status(job, status)
        return job

    for old in JobStatus:
        for new in JobStatus:
            job = job_in(old)
            allowed = new in TRANSITIONS[old]
            if new is JobStatus.RUNNING:
                if allowed:
                    assert store.start_attempt(job, resolved_config={}) >= 1
                else:
                    with pytest.raises(InvalidTransitionError):
                        store.start_attempt(job, resolved_config={})
                with pytest.raises(InvalidTransitionError, match="start_attempt"):
                    store.set_status(job, new)
            elif allowed:
                store.set_status(job, new)
                assert store.get_job(job).status is new
            else:
                with pytest.raises(InvalidTransitionError, match=f"from {old} to {new}"):
                    store.set_status(job, new)
                assert store.get_job(job).status is old
    assert TERMINAL == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    assert JobStatus.QUEUED not in TRANSITIONS[JobStatus.RUNNING]


def test_unknown_status_is_refused(store: Store) -> None:
    with pytest.raises(InvalidTransitionError, match="unknown job status"):
        store.set_status(store.create_job({}), "paused")


def test_failure_keeps_error_text_and_finish_time(store: Store) -> None:
    job_id = _running(store)
    store.set_status(job_id, "failed", error_text="Traceback ...\nValueError: bad label")
    job = store.get_job(job_id)
    assert job.error_text.endswith("bad label") and job.finished_at is not None
    last = store.events(job_id)[-1]
    assert last.level == "error" and last.message == "running -> failed: ValueError: bad label"
    other = store.create_job({})
    store.set_status(other, "failed", error_text="  \n")
    assert store.events(other)[-1].message == "queued -> failed"


def test_resume_after_interruption_counts_attempts(store: Store) -> None:
    job_id = _running(store)
    store.record_metrics(job_id, 0, {"loss": 1.0})
    store.set_status(job_id, "interrupted")
    assert store.start_attempt(job_id, resolved_config={}) == 2
    store.record_metrics(job_id, 1, {"loss": 0.5})
    store.set_status(job_id, "succeeded")
    assert _count(store.url.render_as_string(hide_password=False),
                  "SELECT attempt FROM metrics WHERE step = 1") == 2
    with pytest.raises(InvalidTransitionError):
        store.start_attempt(job_id, resolved_config={})  # succeeded is terminal


def test_a_claim_with_a_stale_attempt_changes_nothing(store: Store) -> None:
    job_id = _running(store)
    store.set_status(job_id, "interrupted")
    # Two resumes both saw attempt 1; the first claims attempt 2, the second is refused.
    assert store.start_attempt(job_id, resolved_config={}, pid=1, hostname="a",
                               expect_attempt=1) == 2
    store.set_status(job_id, "interrupted")  # and even once the job is claimable again
    with pytest.raises(AttemptConflictError, match="at attempt 2"):
        store.start_attempt(job_id, resolved_config={}, pid=2, hostname="b", expect_attempt=1)
    job = store.get_job(job_id)
    assert (job.status, job.attempt, job.pid, job.hostname) == (
        JobStatus.INTERRUPTED, 2, 1, "a")


def test_restart_attempt_keeps_the_job_running_in_its_process(store: Store) -> None:
    job_id = store.create_job({})
    store.start_attempt(job_id, resolved_config={}, pid=10, hostname="h")
    assert store.restart_attempt(job_id, pid=10, hostname="h", reason="worker died") == 2
    assert store.restart_attempt(job_id, pid=10, hostname="h") == 3
    job = store.get_job(job_id)
    assert (job.status, job.attempt) == (JobStatus.RUNNING, 3)
    assert [e.message for e in store.events(job_id)][-3:] == [
        "worker died", "attempt 2 started on h (pid 10, workers restarted)",
        "attempt 3 started on h (pid 10, workers restarted)"]
    for owner in ({"pid": 11, "hostname": "h"}, {"pid": 10, "hostname": "other"}):
        with pytest.raises(AttemptConflictError):
            store.restart_attempt(job_id, **owner)
    store.set_status(job_id, "interrupted")
    with pytest.raises(AttemptConflictError, match="interrupted"):
        store.restart_attempt(job_id, pid=10, hostname="h")
    assert store.get_job(job_id).attempt == 3


# --- heartbeats, staleness and cancellation ------------------------------------------------

def test_heartbeat_only_while_running(store: Store) -> None:
    job_id = store.create_job({})
    assert store.heartbeat(job_id) is False
    store.start_attempt(job_id, resolved_config={})
    before = store.get_job(job_id).heartbeat_at
    assert store.heartbeat(job_id) is True
    assert store.get_job(job_id).heartbeat_at > before
    with pytest.raises(JobNotFoundError):
        store.heartbeat(12345)


def test_heartbeat_of_a_process_that_no_longer_runs_the_job(store: Store) -> None:
    job_id = store.create_job({})
    store.start_attempt(job_id, resolved_config={}, pid=10, hostname="h")
    assert store.heartbeat(job_id, pid=10, hostname="h") is True
    # Declared interrupted and resumed by another process: the first must learn it.
    store.set_status(job_id, "interrupted")
    store.start_attempt(job_id, resolved_config={}, pid=20, hostname="h")
    before = store.get_job(job_id).heartbeat_at
    assert store.heartbeat(job_id, pid=10, hostname="h") is False
    assert store.get_job(job_id).heartbeat_at == before
    assert store.heartbeat(job_id, pid=20, hostname="h") is True


def test_stale_heartbeat_marks_the_job_interrupted(store: Store, db_url: str,
                                                   backend: str) -> None:
    stale, fresh, queued = _running(store), _running(store), store.create_job({})
    old = utcnow() - timedelta(seconds=120)
    sql(db_url, "UPDATE jobs SET heartbeat_at = :old WHERE id = :id",
        {"old": old.strftime("%Y-%m-%d %H:%M:%S.%f") if backend == "sqlite" else old,
         "id": stale})
    assert store.mark_stale_interrupted(stale_after_s=60) == [stale]
    assert store.get_job(stale).status is JobStatus.INTERRUPTED
    assert store.get_job(fresh).status is JobStatus.RUNNING
    assert store.get_job(queued).status is JobStatus.QUEUED
    assert "no heartbeat" in store.events(stale)[-1].message
    assert store.events(stale)[-1].level == "warning"
    assert store.heartbeat(stale) is False  # the (late) job learns it was written off
    assert store.mark_stale_interrupted(stale_after_s=60) == []


def test_cancel_a_running_job_is_a_request(store: Store) -> None:
    job_id = _running(store)
    assert not store.is_cancel_requested(job_id)
    assert store.request_cancel(job_id) is JobStatus.RUNNING
    assert store.request_cancel(job_id) is JobStatus.RUNNING  # once is enough
    assert store.is_cancel_requested(job_id)
    assert sum(e.message == "cancel requested" for e in store.events(job_id)) == 1
    store.set_status(job_id, "cancelled")  # the job acknowledges
    assert store.get_job(job_id).is_terminal


@pytest.mark.parametrize("status", ["queued", "interrupted"])
def test_cancel_a_job_nobody_runs_is_immediate(store: Store, status: str) -> None:
    job_id = store.create_job({}) if status == "queued" else _running(store)
    if status == "interrupted":
        store.set_status(job_id, "interrupted")
    assert store.request_cancel(job_id) is JobStatus.CANCELLED
    job = store.get_job(job_id)
    assert job.status is JobStatus.CANCELLED and job.finished_at is not None
    assert store.is_cancel_requested(job_id)
    with pytest.raises(InvalidTransitionError):
        store.start_attempt(job_id, resolved_config={})


def test_cancel_a_finished_job_changes_nothing(store: Store) -> None:
    job_id = _running(store)
    store.set_status(job_id, "succeeded")
    assert store.request_cancel(job_id) is JobStatus.SUCCEEDED
    assert not store.is_cancel_requested(job_id)


# --- metrics --------------------------------------------------------------------------------

def test_metric_upsert_keeps_one_row_with_the_last_value(store: Store, db_url: str) -> None:
    job_id = _running(store)
    store.record_metrics(job_id, 3, {"val/loss": 0.9, "val/acc": 0.5}, epoch=0)
    store.record_metrics(job_id, 3, {"val/loss": 0.7}, epoch=1)  # a retried epoch
    assert _count(db_url, "SELECT count(*) FROM metrics") == 2
    assert sql(db_url, "SELECT value, epoch FROM metrics WHERE name = 'val/loss'") == [
        (0.7, 1)]
    assert store.metrics(job_id) == {"val/acc": [(3, 0.5)], "val/loss": [(3, 0.7)]}


def test_metric_upsert_without_a_native_upsert(store: Store, db_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The portable path other backends take (select, then update or insert) agrees."""
    monkeypatch.setattr("lungvit.training.store.base._NATIVE_UPSERT", {})
    job_id = _running(store)
    store.record_metrics(job_id, 0, {"loss": 0.9, "acc": 0.1})
    store.record_metrics(job_id, 0, {"loss": 0.8})
    store.record_checkpoint(job_id, version=1, path="/a", sha256="a" * 64)
    store.record_checkpoint(job_id, version=1, path="/b", sha256="b" * 64)
    assert _count(db_url, "SELECT count(*) FROM metrics") == 2
    assert store.metrics(job_id) == {"acc": [(0, 0.1)], "loss": [(0, 0.8)]}
    assert [c.path for c in store.checkpoints(job_id)] == ["/b"]


def test_metric_series_in_step_order(store: Store) -> None:
    job_id = _running(store)
    for step in (2, 0, 1):
        store.record_metrics(job_id, step, {"loss": 10.0 - step, "acc": step / 10})
    assert store.metrics(job_id, names=["loss"]) == {"loss": [(0, 10.0), (1, 9.0), (2, 8.0)]}
    assert list(store.metrics(job_id)) == ["acc", "loss"]
    assert store.metrics(store.create_job({})) == {}


def test_metric_values_are_validated_and_nan_survives(store: Store) -> None:
    job_id = _running(store)
    store.record_metrics(job_id, 0, {"loss": float("nan")})
    assert math.isnan(store.metrics(job_id)["loss"][0][1])
    with pytest.raises(TypeError, match="expected a number"):
        store.record_metrics(job_id, 1, {"loss": "0.5"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="step"):
        store.record_metrics(job_id, -1, {"loss": 0.5})
    store.record_metrics(job_id, 1, {"np": np.float32(0.25), "int": np.int64(3)})
    assert store.metrics(job_id, ["np", "int"]) == {"int": [(1, 3.0)], "np": [(1, 0.25)]}
    store.record_metrics(job_id, 1, {})  # nothing to do
    with pytest.raises(JobNotFoundError):
        store.record_metrics(999, 0, {"loss": 0.5})


def test_final_metrics_and_compare(store: Store) -> None:
    a, b = _running(store), _running(store)
    for step, loss in enumerate((0.9, 0.6, 0.4)):
        store.record_metrics(a, step, {"val/loss": loss, "val/acc": 0.5 + step / 10})
    store.record_metrics(b, 0, {"val/loss": 0.8})
    store.set_result(b, "/runs/b/best.safetensors", {"val/loss": 0.3, "val/f1": 0.7})
    assert store.final_metrics(a) == {"val/loss": 0.4, "val/acc": 0.7}
    assert store.compare(a, b) == {"val/acc": (0.7, None), "val/f1": (None, 0.7),
                                   "val/loss": (0.4, 0.3)}
    assert store.get_job(b).result_checkpoint_path == "/runs/b/best.safetensors"


# --- checkpoints and events -----------------------------------------------------------------

def test_checkpoints_best_marker_and_promotion(store: Store) -> None:
    job_id = _running(store)
    for version, loss in ((1, 0.9), (2, 0.5), (3, 0.7)):
        store.record_checkpoint(job_id, version=version, path=f"/c/{version}",
                                sha256=f"{version:064x}", metric_name="val/loss",
                                metric_value=loss, is_best=loss == 0.5 or version == 1)
    rows = store.checkpoints(job_id)
    assert [(c.version, c.is_best, c.promoted) for c in rows] == [
        (1, False, False), (2, True, False), (3, False, False)]
    assert store.promote(job_id, 3).promoted
    promoted = store.promote(job_id, 2)
    assert (promoted.version, promoted.promoted, promoted.path) == (2, True, "/c/2")
    assert [c.version for c in store.checkpoints(job_id) if c.promoted] == [2]
    with pytest.raises(JobNotFoundError, match="no checkpoint version 9"):
        store.promote(job_id, 9)


def test_a_resaved_checkpoint_version_replaces_its_row(store: Store) -> None:
    job_id = _running(store)
    store.record_checkpoint(job_id, version=1, path="/old", sha256="a" * 64)
    store.promote(job_id, 1)
    store.record_checkpoint(job_id, version=1, path="/new", sha256="b" * 64)
    (row,) = store.checkpoints(job_id)
    assert (row.path, row.sha256, row.promoted) == ("/new", "b" * 64, True)


def test_events_poll_with_since_id(store: Store) -> None:
    job_id = store.create_job({})
    first = store.events(job_id)
    assert [e.message for e in first] == ["job queued"]
    ids = [store.add_event(job_id, f"line {i}", level) for i, level in
           enumerate(("debug", "info", "warning", "error"))]
    assert ids == sorted(ids) and ids[0] > first[-1].id
    newer = store.events(job_id, since_id=ids[1])
    assert [(e.id, e.level, e.message) for e in newer] == [(ids[2], "warning", "line 2"),
                                                           (ids[3], "error", "line 3")]
    assert len(store.events(job_id, limit=2)) == 2
    with pytest.raises(ValueError, match="event level"):
        store.add_event(job_id, "x", level="fatal")
    with pytest.raises(JobNotFoundError):
        store.add_event(999, "x")


# --- the store object -----------------------------------------------------------------------

def test_store_pickles_and_reopens_lazily(store: Store) -> None:
    job_id = store.create_job({})
    copy = pickle.loads(pickle.dumps(store))
    assert copy.get_job(job_id).id == job_id
    copy.close()
    store.close()
    assert store.get_job(job_id).id == job_id  # reconnects after close


def test_snapshots_are_detached_from_the_database(store: Store, db_url: str) -> None:
    job_id = store.create_job({"a": [1, 2]})
    job = store.get_job(job_id)
    job.request_config["a"].append(3)
    assert store.get_job(job_id).request_config == {"a": [1, 2]}
    shown = repr(open_store(db_url))
    assert shown.startswith(f"Store('{db_url.split(':', 1)[0]}:")
    if "@" in db_url:  # the password never shows
        assert ":***@" in shown and db_url.split(":")[2].split("@")[0] not in shown
