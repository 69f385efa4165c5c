"""Fixtures of the store tests: a fresh SQLite URL, and child processes started together."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lungvit.training.store import Store, open_store

WORKER = Path(__file__).with_name("_store_worker.py")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lungvit.db'}"


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
