"""The store's operations: what the job writes and the app reads.

Every method runs in its own short transaction and returns plain frozen snapshots, never
live ORM objects, so callers can keep results across threads and sessions. Callers pass
only scrubbed data (paths, hyperparameters, metric values): nothing from a scan's header
is ever written here.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from .engine import Database, describe_connect_error, is_locked_error, migrate
from .errors import (AttemptConflictError, InvalidTransitionError, JobNotFoundError,
                     StoreError)
from .paths import default_db_url
from .records import CheckpointRecord, EventRecord, JobRecord, snapshot
from .schema import (EVENT_LEVELS, TERMINAL, TRANSITIONS, Base, Checkpoint, Event, Job,
                     JobStatus, Metric, utcnow)

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
LOCK_RETRIES = 5


def _retrying(fn: Callable[P, R]) -> Callable[P, R]:
    """Redo the whole (short) transaction if SQLite still reports "database is locked".

    A last resort: with ``BEGIN IMMEDIATE`` and a 30 s busy timeout it should never be
    needed, and ``Store.lock_retries`` counts the times it was (the tests require 0).
    """
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        store: Store = args[0]  # type: ignore[assignment]
        delay = 0.05
        for attempt in range(LOCK_RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if attempt == LOCK_RETRIES or not is_locked_error(exc):
                    raise
                store.lock_retries += 1
                logger.warning("%s: database is locked, retry %d of %d", fn.__name__,
                               attempt + 1, LOCK_RETRIES)
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")
    return wrapper


def _metric_value(name: str, value: float) -> float | None:
    """``value`` as a float (numpy and 0-d torch scalars included); NaN becomes None."""
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise TypeError(f"metric {name!r}: expected a number, got {type(value).__name__}")
    value = float(value)
    return None if math.isnan(value) else value  # NULL stands for NaN (SQLite has none)


_NATIVE_UPSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def _upsert(s: Session, model: type[Base], rows: list[dict[str, Any]], keys: list[str],
            update_cols: list[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE, or a portable fallback on other backends."""
    insert = _NATIVE_UPSERT.get(s.get_bind().dialect.name)
    if insert is not None:
        stmt = insert(model).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=keys, set_={c: stmt.excluded[c] for c in update_cols})
        s.execute(stmt)
        return
    for row in rows:
        found = s.scalars(select(model).filter_by(**{k: row[k] for k in keys})
                          .with_for_update()).one_or_none()
        if found is None:
            s.add(model(**row))
        else:
            for c in update_cols:
                setattr(found, c, row[c])


class Store:
    """Jobs, metrics, checkpoints and events of LungViT fine-tunes.

    Use ``open_store`` to get one (it upgrades the schema). Thread-safe; after ``fork`` a
    child process opens its own connections; picklable (e.g. for Ray workers).
    """

    def __init__(self, url: str | URL, *, create: bool = True) -> None:
        self._db = Database(url, create=create)
        self.lock_retries = 0

    @property
    def url(self) -> URL:
        return self._db.url

    @property
    def engine(self) -> Engine:
        """This process's SQLAlchemy engine (for diagnostics and ad-hoc queries)."""
        return self._db.engine

    def close(self) -> None:
        """Close this process's pooled connections; the store reopens them if used again."""
        self._db.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"

    # --- helpers (run inside a caller's transaction) ------------------------------------

    @staticmethod
    def _job(s: Session, job_id: int, *, lock: bool = False) -> Job:
        job = s.get(Job, job_id, with_for_update=lock or None)
        if job is None:
            raise JobNotFoundError(f"no job {job_id} in the store")
        return job

    @staticmethod
    def _event(s: Session, job_id: int, message: str, level: str = "info") -> Event:
        if level not in EVENT_LEVELS:
            raise ValueError(f"event level {level!r} is not one of {EVENT_LEVELS}")
        ev = Event(job_id=job_id, ts=utcnow(), level=level, message=message)
        s.add(ev)
        return ev

    @staticmethod
    def _check_transition(job: Job, new: JobStatus) -> None:
        old = JobStatus(job.status)
        if new not in TRANSITIONS[old]:
            raise InvalidTransitionError(f"job {job.id} cannot go from {old} to {new}")

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

    # --- metrics ------------------------------------------------------------------------

    @_retrying
    def record_metrics(self, job_id: int, step: int, values: Mapping[str, float], *,
                       epoch: int | None = None, attempt: int | None = None) -> None:
        """Record several scalars of one step in one transaction.

        A (job, step, name) that already has a value is overwritten, so a retried epoch
        updates its rows instead of duplicating them. NaN is stored as NULL and read back
        as NaN. ``attempt`` defaults to the job's current attempt.
        """
        if not values:
            return
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        rows = [{"name": str(name), "value": _metric_value(name, v)}
                for name, v in values.items()]
        with self._db.write() as s:
            job = self._job(s, job_id)
            attempt = job.attempt if attempt is None else attempt
            now = utcnow()
            for row in rows:
                row.update(job_id=job_id, step=step, epoch=epoch, attempt=attempt,
                           recorded_at=now)
            _upsert(s, Metric, rows, ["job_id", "step", "name"],
                    ["value", "epoch", "attempt", "recorded_at"])

    @_retrying
    def metrics(self, job_id: int, names: Iterable[str] | None = None
                ) -> dict[str, list[tuple[int, float]]]:
        """Each metric's series ``name -> [(step, value), ...]`` in step order."""
        stmt = (select(Metric.name, Metric.step, Metric.value).where(Metric.job_id == job_id)
                .order_by(Metric.name, Metric.step))
        if names is not None:
            stmt = stmt.where(Metric.name.in_(list(names)))
        out: dict[str, list[tuple[int, float]]] = {}
        with self._db.read() as s:
            self._job(s, job_id)
            for name, step, value in s.execute(stmt):
                out.setdefault(name, []).append((step, math.nan if value is None else value))
        return out

    @_retrying
    def final_metrics(self, job_id: int) -> dict[str, float]:
        """The job's final metrics: those given to ``set_result``, else each metric's value
        at its last recorded step."""
        with self._db.read() as s:
            job = self._job(s, job_id)
            if job.final_metrics is not None:
                return {k: math.nan if v is None else v for k, v in job.final_metrics.items()}
            last = (select(Metric.name, func.max(Metric.step).label("step"))
                    .where(Metric.job_id == job_id).group_by(Metric.name).subquery())
            rows = s.execute(select(Metric.name, Metric.value)
                             .join(last, (Metric.name == last.c.name)
                                   & (Metric.step == last.c.step))
                             .where(Metric.job_id == job_id))
            return {name: math.nan if v is None else v for name, v in rows}

    def compare(self, job_a: int, job_b: int) -> dict[str, tuple[float | None, float | None]]:
        """Final metrics of two jobs side by side: ``name -> (a, b)``, None where one lacks it."""
        a, b = self.final_metrics(job_a), self.final_metrics(job_b)
        return {name: (a.get(name), b.get(name)) for name in sorted(a.keys() | b.keys())}

    # --- checkpoints --------------------------------------------------------------------

    @_retrying
    def record_checkpoint(self, job_id: int, *, version: int, path: str, sha256: str,
                          metric_name: str | None = None, metric_value: float | None = None,
                          is_best: bool = False) -> None:
        """Record (or, for a retried save, replace) checkpoint ``version`` of a job.

        ``is_best`` moves the job's best marker to this version.
        """
        row = {"job_id": job_id, "version": version, "path": str(path), "sha256": sha256,
               "metric_name": metric_name, "is_best": bool(is_best), "promoted": False,
               "metric_value": None if metric_value is None
               else _metric_value(metric_name or "metric_value", metric_value),
               "created_at": utcnow()}
        with self._db.write() as s:
            self._job(s, job_id, lock=True)
            if is_best:
                s.execute(update(Checkpoint).where(Checkpoint.job_id == job_id,
                                                   Checkpoint.version != version)
                          .values(is_best=False).execution_options(synchronize_session=False))
            _upsert(s, Checkpoint, [row], ["job_id", "version"],
                    ["path", "sha256", "metric_name", "metric_value", "is_best", "created_at"])
            shown = "" if metric_value is None else f" ({metric_name}={metric_value:.4g})"
            self._event(s, job_id, f"checkpoint v{version} saved{shown}"
                                   + (", best so far" if is_best else ""))

    @_retrying
    def checkpoints(self, job_id: int) -> list[CheckpointRecord]:
        """The job's checkpoints in version order."""
        with self._db.read() as s:
            self._job(s, job_id)
            rows = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                             .order_by(Checkpoint.version))
            return [snapshot(CheckpointRecord, c) for c in rows]

    @_retrying
    def promote(self, job_id: int, version: int) -> CheckpointRecord:
        """Mark checkpoint ``version`` as the job's promoted one (and no other)."""
        with self._db.write() as s:
            self._job(s, job_id, lock=True)
            ckpt = s.scalars(select(Checkpoint).filter_by(job_id=job_id, version=version)
                             ).one_or_none()
            if ckpt is None:
                raise JobNotFoundError(f"job {job_id} has no checkpoint version {version}")
            s.execute(update(Checkpoint).where(Checkpoint.job_id == job_id)
                      .values(promoted=Checkpoint.version == version)
                      .execution_options(synchronize_session=False))
            self._event(s, job_id, f"checkpoint v{version} promoted")
            s.flush()
            s.refresh(ckpt)
            return snapshot(CheckpointRecord, ckpt)

    # --- events -------------------------------------------------------------------------

    @_retrying
    def add_event(self, job_id: int, message: str, level: str = "info") -> int:
        """Append a line to the job's log (level: debug, info, warning, error). Returns its id."""
        with self._db.write() as s:
            self._job(s, job_id)
            ev = self._event(s, job_id, message, level)
            s.flush()
            return ev.id

    @_retrying
    def events(self, job_id: int, since_id: int = 0, limit: int | None = None
               ) -> list[EventRecord]:
        """The job's events with ids above ``since_id`` (for polling), oldest first."""
        stmt = (select(Event).where(Event.job_id == job_id, Event.id > since_id)
                .order_by(Event.id).limit(limit))
        with self._db.read() as s:
            self._job(s, job_id)
            return [snapshot(EventRecord, e) for e in s.scalars(stmt)]


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
