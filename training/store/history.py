"""The store's records of a job's run: metrics per step, checkpoints and events.

Every method runs in its own short transaction and returns plain frozen snapshots.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from sqlalchemy import func, select, update

from .base import StoreBase, _metric_value, _retrying, _upsert
from .errors import JobNotFoundError
from .records import CheckpointRecord, EventRecord, snapshot
from .schema import Checkpoint, Event, Metric, utcnow


class History(StoreBase):
    """Metrics, checkpoints and events of the store's jobs (a part of :class:`Store`)."""

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
