"""ORM models of the tracking store (SQLAlchemy 2.x typed declarative mapping).

One row of ``jobs`` is one requested fine-tune. A job that is interrupted and resumed keeps
its row; ``attempt`` counts the starts, and metrics carry the attempt that wrote them, so a
resumed run's history stays in one place. Callers pass only scrubbed data: configuration
dicts hold paths and hyperparameters, never anything read from a scan's header.
"""
from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class JobStatus(enum.StrEnum):
    """Life cycle of a job; see ``TRANSITIONS``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


# Allowed status changes. Terminal states (succeeded, failed, cancelled) have none;
# ``interrupted`` (the job's process died or stopped heartbeating) may be resumed, which
# ``Store.start_attempt`` does with attempt + 1. ``running`` is entered only through
# ``start_attempt``, never through ``set_status``.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED,
                                  JobStatus.INTERRUPTED}),
    JobStatus.INTERRUPTED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}
TERMINAL: frozenset[JobStatus] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
EVENT_LEVELS = ("debug", "info", "warning", "error")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zones: values are stored as naive UTC (SQLAlchemy's fixed-width
    ISO text, so they compare correctly as strings) and come back aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps UTC-aware times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    """The current time, UTC-aware."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class SchemaVersion(Base):
    """A single row (id = 1) holding the version the migrations brought the schema to."""

    __tablename__ = "schema_version"
    __table_args__ = (CheckConstraint("id = 1", name="ck_schema_version_single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int]
    updated_at: Mapped[datetime]


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("status IN (" + ", ".join(f"'{s.value}'" for s in JobStatus) + ")",
                        name="ck_jobs_status"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    request_config: Mapped[dict[str, Any]]
    resolved_config: Mapped[dict[str, Any] | None]
    dataset_fingerprint: Mapped[str | None] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    error_text: Mapped[str | None] = mapped_column(Text)
    hardware: Mapped[dict[str, Any] | None]
    ray_address: Mapped[str | None] = mapped_column(String(500))
    pid: Mapped[int | None]
    hostname: Mapped[str | None] = mapped_column(String(255))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    run_dir: Mapped[str | None] = mapped_column(Text)
    result_checkpoint_path: Mapped[str | None] = mapped_column(Text)
    final_metrics: Mapped[dict[str, Any] | None]


class Metric(Base):
    """One scalar at one step. A retried step overwrites its row (upsert), never adds one."""

    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("job_id", "step", "name", name="uq_metrics_job_step_name"),
        Index("ix_metrics_job_name_step", "job_id", "name", "step"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    epoch: Mapped[int | None]
    name: Mapped[str] = mapped_column(String(200))
    # NULL stands for NaN: SQLite cannot store NaN.
    value: Mapped[float | None] = mapped_column(Float)
    attempt: Mapped[int]
    recorded_at: Mapped[datetime]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "version", name="uq_checkpoints_job_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    version: Mapped[int]
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    metric_name: Mapped[str | None] = mapped_column(String(200))
    metric_value: Mapped[float | None] = mapped_column(Float)
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint("level IN (" + ", ".join(f"'{lv}'" for lv in EVENT_LEVELS) + ")",
                        name="ck_events_level"),
        Index("ix_events_job_id_id", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    ts: Mapped[datetime]
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
