"""The store's operations: what the job writes and the app reads.

Every method runs in its own short transaction and returns plain frozen snapshots, never
live ORM objects, so callers can keep results across threads and sessions. Callers pass
only scrubbed data (paths, hyperparameters, metric values): nothing from a scan's header
is ever written here.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from .base import _metric_value, _retrying
from .engine import describe_connect_error, migrate
from .errors import AttemptConflictError, InvalidTransitionError, StoreError
from .history import History
from .paths import default_db_url
from .records import JobRecord, snapshot
from .schema import TERMINAL, Job, JobStatus, utcnow


class Store(History):
    """Jobs, metrics, checkpoints and events of LungViT fine-tunes.

    Use ``open_store`` to get one (it upgrades the schema). Thread-safe; after ``fork`` a
    child process opens its own connections; picklable (e.g. for Ray workers). The job
    lifecycle is here; metrics, checkpoints and events are :class:`.history.History`.
    """

    # --- jobs ---------------------------------------------------------------------------

    @_retrying
    def create_job(self, request_config: Mapping[str, Any], *, name: str | None = None) -> int:
        """Queue a fine-tune request. Returns the new job's id."""
        with self._db.write() as s:
            job = Job(name=name, status=JobStatus.QUEUED.value,
                      request_config=dict(request_config), created_at=utcnow(), attempt=0,
                      cancel_requested=False)
            s.add(job)
            s.flush()
            self._event(s, job.id, "job queued")
            return job.id

    @_retrying
    def get_job(self, job_id: int) -> JobRecord:
        """A snapshot of one job; ``JobNotFoundError`` if there is none."""
        with self._db.read() as s:
            return snapshot(JobRecord, self._job(s, job_id))

    @_retrying
    def list_jobs(self, status: str | Iterable[str] | None = None, limit: int = 100
                  ) -> list[JobRecord]:
        """Jobs, newest first, optionally only those in one or several statuses."""
        stmt = select(Job).order_by(Job.id.desc()).limit(limit)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            stmt = stmt.where(Job.status.in_([JobStatus(x).value for x in wanted]))
        with self._db.read() as s:
            return [snapshot(JobRecord, j) for j in s.scalars(stmt)]

    @_retrying
    def set_status(self, job_id: int, status: str, *, error_text: str | None = None) -> None:
        """Move a job to ``status``; ``InvalidTransitionError`` if its life cycle forbids it.

        ``running`` is entered through ``start_attempt`` only. Terminal states set
        ``finished_at``.
        """
        try:
            new = JobStatus(status)
        except ValueError:
            raise InvalidTransitionError(f"unknown job status {status!r}") from None
        if new is JobStatus.RUNNING:
            raise InvalidTransitionError("a job starts running through start_attempt()")
        with self._db.write() as s:
            job = self._job(s, job_id, lock=True)
            old = job.status
            self._check_transition(job, new)
            job.status = new.value
            if error_text is not None:
                job.error_text = error_text
            if new in TERMINAL:
                job.finished_at = utcnow()
            lines = (error_text or "").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
            level = "error" if new is JobStatus.FAILED else (
                "warning" if new is JobStatus.INTERRUPTED else "info")
            self._event(s, job_id, f"{old} -> {new}{detail}", level)

    @_retrying
    def start_attempt(self, job_id: int, *, resolved_config: Mapping[str, Any],
                      hardware: Mapping[str, Any] | None = None, ray_address: str | None = None,
                      pid: int | None = None, hostname: str | None = None,
                      run_dir: str | None = None, dataset_fingerprint: str | None = None,
                      expect_attempt: int | None = None) -> int:
        """Claim a queued (or interrupted, on resume) job: mark it running as its next attempt.

        Reading the attempt and writing the next one happen in one write transaction
        (``BEGIN IMMEDIATE`` on SQLite), so of several processes claiming the same job at
        once exactly one succeeds.

        Args:
            job_id: the job.
            resolved_config, hardware, ray_address, run_dir, dataset_fingerprint: what this
                attempt runs with, where (kept on the job).
            pid, hostname: the process running the attempt (default: the caller).
            expect_attempt: the attempt number the caller saw when it decided to run the
                job; if another process has claimed an attempt since, nothing changes.

        Returns:
            The new attempt number.

        Raises:
            AttemptConflictError: the job's attempt is no longer ``expect_attempt``.
            InvalidTransitionError: the job is neither queued nor interrupted.
        """
        with self._db.write() as s:
            job = self._job(s, job_id, lock=True)
            if expect_attempt is not None and job.attempt != expect_attempt:
                raise AttemptConflictError(
                    f"job {job_id} is at attempt {job.attempt} ({job.status}), not "
                    f"{expect_attempt}: another process claimed it")
            self._check_transition(job, JobStatus.RUNNING)
            now = utcnow()
            job.status = JobStatus.RUNNING.value
            job.attempt += 1
            job.resolved_config = dict(resolved_config)
            job.hardware = dict(hardware) if hardware is not None else None
            job.ray_address = ray_address
            job.pid = os.getpid() if pid is None else pid
            job.hostname = socket.gethostname() if hostname is None else hostname
            if run_dir is not None:
                job.run_dir = run_dir
            if dataset_fingerprint is not None:
                job.dataset_fingerprint = dataset_fingerprint
            job.started_at = job.heartbeat_at = now
            job.finished_at = job.error_text = None
            self._event(s, job_id, f"attempt {job.attempt} started on {job.hostname} "
                                   f"(pid {job.pid})")
            return job.attempt

    @_retrying
    def restart_attempt(self, job_id: int, *, pid: int, hostname: str,
                        reason: str | None = None) -> int:
        """Count a restart of a running job's workers as the job's next attempt.

        The job stays running (it never passes through another status, so no other process
        can take it over meanwhile); the attempt is read and incremented in one write
        transaction, so concurrent callers each get a number of their own.

        Args:
            job_id: the job.
            pid, hostname: the job process that owns the running attempt (the one that
                called :meth:`start_attempt`); anyone else is refused.
            reason: a warning event written with the new attempt (why it restarted).

        Returns:
            The new attempt number.

        Raises:
            AttemptConflictError: the job is not running, or not in that process.
        """
        with self._db.write() as s:
            job = self._job(s, job_id, lock=True)
            if job.status != JobStatus.RUNNING.value or (job.pid, job.hostname) != (
                    pid, hostname):
                raise AttemptConflictError(
                    f"job {job_id} is {job.status} in pid {job.pid} on {job.hostname}, not "
                    f"running in pid {pid} on {hostname}: it is no longer that process's "
                    "to restart")
            if reason:
                self._event(s, job_id, reason, "warning")
            job.attempt += 1
            job.started_at = job.heartbeat_at = utcnow()
            self._event(s, job_id, f"attempt {job.attempt} started on {job.hostname} "
                                   f"(pid {job.pid}, workers restarted)")
            return job.attempt

    @_retrying
    def heartbeat(self, job_id: int, *, pid: int | None = None,
                  hostname: str | None = None) -> bool:
        """Record that the job is alive. False if it is no longer running (the job should
        stop: it was cancelled, or marked interrupted after missing heartbeats), or, when
        ``pid`` and ``hostname`` are given, no longer running in that process (it was
        declared interrupted and resumed by another)."""
        owner = [] if pid is None else [Job.pid == pid, Job.hostname == hostname]
        with self._db.write() as s:
            done = s.execute(update(Job).where(Job.id == job_id,
                                               Job.status == JobStatus.RUNNING.value, *owner)
                             .values(heartbeat_at=utcnow())
                             .execution_options(synchronize_session=False))
            if done.rowcount:
                return True
            self._job(s, job_id)  # raises if there is no such job
            return False

    @_retrying
    def request_cancel(self, job_id: int) -> JobStatus:
        """Ask for a job to stop. Returns its status afterwards.

        A queued or interrupted job (no process is running it) is cancelled at once; a
        running one gets ``cancel_requested`` and stops itself; a finished one is left as is.
        """
        with self._db.write() as s:
            job = self._job(s, job_id, lock=True)
            status = JobStatus(job.status)
            if status in (JobStatus.QUEUED, JobStatus.INTERRUPTED):
                job.status, job.finished_at = JobStatus.CANCELLED.value, utcnow()
                job.cancel_requested = True
                self._event(s, job_id, f"cancelled while {status}")
                return JobStatus.CANCELLED
            if status is JobStatus.RUNNING and not job.cancel_requested:
                job.cancel_requested = True
                self._event(s, job_id, "cancel requested")
            return status

    @_retrying
    def is_cancel_requested(self, job_id: int) -> bool:
        """Whether the job has been asked to stop (or is already cancelled)."""
        with self._db.read() as s:
            job = self._job(s, job_id)
            return job.cancel_requested or job.status == JobStatus.CANCELLED.value

    @_retrying
    def mark_stale_interrupted(self, *, stale_after_s: float = 60.0) -> list[int]:
        """Running jobs whose last heartbeat is older than ``stale_after_s`` become
        ``interrupted`` (their process died); returns their ids."""
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        last_seen = func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)
        with self._db.write() as s:
            stale = s.scalars(select(Job).where(Job.status == JobStatus.RUNNING.value,
                                                last_seen < cutoff).with_for_update()).all()
            for job in stale:
                job.status = JobStatus.INTERRUPTED.value
                seen = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at \
                    else "never"
                self._event(s, job.id, f"running -> interrupted: no heartbeat for "
                                       f"{stale_after_s:g} s (last {seen})", "warning")
            return [job.id for job in stale]

    @_retrying
    def set_result(self, job_id: int, checkpoint_path: str,
                   final_metrics: Mapping[str, float] | None = None) -> None:
        """Record the job's resulting checkpoint and, optionally, its final metrics."""
        with self._db.write() as s:
            job = self._job(s, job_id, lock=True)
            job.result_checkpoint_path = checkpoint_path
            if final_metrics is not None:
                job.final_metrics = {k: _metric_value(k, v) for k, v in final_metrics.items()}


def open_store(url: str | URL | None = None, *, create: bool = True) -> Store:
    """Open the tracking store and bring its schema up to date.

    Args:
        url: ``sqlite:///PATH`` or ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB``;
            default ``default_db_url()`` (a SQLite file in the user's data directory).
        create: create the database (and its folder) if missing; when false, a missing or
            empty database raises ``StoreError``.

    Returns:
        The store.

    Raises:
        StoreError: the URL is not one of those, or the database cannot be opened (one
            line saying what to fix).
    """
    store = Store(default_db_url() if url is None else url, create=create)
    try:
        migrate(store._db, create=create)
    except OperationalError as exc:
        store.close()
        if store.url.get_backend_name() == "postgresql":
            raise StoreError(describe_connect_error(store.url, exc)) from None
        detail = " ".join(str(exc.orig).split())
        raise StoreError(f"cannot open the SQLite store {store.url.database} ({detail}): "
                         "fix the path in --db") from None
    return store
