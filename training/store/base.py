"""The store's base: its connection, the transaction helpers every operation uses.

:class:`StoreBase` owns the database handle and the helpers that run inside a caller's
transaction; ``_retrying`` redoes a short transaction SQLite still found locked. The
operations are :mod:`.history` (metrics, checkpoints, events) and :mod:`.repo` (jobs).
"""
from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from .engine import Database, is_locked_error
from .errors import InvalidTransitionError, JobNotFoundError
from .schema import EVENT_LEVELS, TRANSITIONS, Base, Event, Job, JobStatus, utcnow

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
        store: StoreBase = args[0]  # type: ignore[assignment]
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


class StoreBase:
    """A store's database handle and the helpers its operations share (see :class:`Store`)."""

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

    def __enter__(self) -> StoreBase:
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
