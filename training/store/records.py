"""Plain frozen snapshots the store hands out instead of live ORM rows."""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from .schema import TERMINAL, Base, JobStatus


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one job row."""

    id: int
    name: str | None
    status: JobStatus
    request_config: dict[str, Any]
    resolved_config: dict[str, Any] | None
    dataset_fingerprint: str | None
    attempt: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    error_text: str | None
    hardware: dict[str, Any] | None
    ray_address: str | None
    pid: int | None
    hostname: str | None
    cancel_requested: bool
    run_dir: str | None
    result_checkpoint_path: str | None
    final_metrics: dict[str, Any] | None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class CheckpointRecord:
    id: int
    job_id: int
    version: int
    path: str
    sha256: str
    metric_name: str | None
    metric_value: float | None
    is_best: bool
    promoted: bool
    created_at: datetime


@dataclass(frozen=True)
class EventRecord:
    id: int
    job_id: int
    ts: datetime
    level: str
    message: str


SnapT = TypeVar("SnapT", JobRecord, CheckpointRecord, EventRecord)


def snapshot(cls: type[SnapT], row: Base) -> SnapT:
    values = {f.name: getattr(row, f.name) for f in fields(cls)}
    if cls is JobRecord:
        values["status"] = JobStatus(values["status"])
    return cls(**values)
