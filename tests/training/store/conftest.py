"""Fixtures of the store tests: a fresh database on each backend (a SQLite file, and a
database of its own on a real PostgreSQL server), raw SQL on it, and child processes
started together."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from lungvit.training.store import Store, open_store

WORKER = Path(__file__).with_name("_store_worker.py")
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A URL of a new, empty store database on ``backend``."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'lungvit.db'}"
    return request.getfixturevalue("postgres_url")


def sql(url: str, statement: str, params: dict[str, Any] | None = None) -> list[tuple]:
    """Run one statement on the database of ``url`` outside the store (its own connection,
    committed at once); returns the rows it selected."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params or {})
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def scalar(url: str, statement: str, params: dict[str, Any] | None = None) -> Any:
    return sql(url, statement, params)[0][0]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.close()


class Workers:
    """Starts ``_store_worker.py`` children; each waits for the go file before working."""

    def __init__(self, go: Path) -> None:
        self.go = go
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, mode: str, url: str, *args: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, str(WORKER), mode, url, str(self.go),
                                 *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def go_when_ready(self) -> None:
        """Wait until every child has imported everything, then release them all at once."""
        for proc in self.procs:
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read()[-3000:])
        self.go.touch()

    @staticmethod
    def result(proc: subprocess.Popen[str], timeout: float = 60) -> dict:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path / "go")
    yield w
    w.kill_all()
