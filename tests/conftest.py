"""Fixtures of every test: nothing is written to the user's own data directory; a
PostgreSQL server for the tests that need one."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ._postgres import PostgresServer, unavailable_reason


@pytest.fixture(scope="session", autouse=True)
def _patient_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Decoding a DICOM creates the installation's patient-key secret (lungvit.core.io.phi);
    the tests (and the processes they start) use one of their own, with a fixed content so
    that patient-level splits (and what a test model learns from them) are the same on every
    machine and every run."""
    name = "LUNGVIT_PATIENT_KEY_FILE"
    before = os.environ.get(name)
    if before is None:
        path = tmp_path_factory.mktemp("patient-key") / "patient-key.secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write("6c756e677669742d74657374732d6f6e6c792d6e6f742d612d736563726574\n")
        os.environ[name] = str(path)
    yield
    if before is None:
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session (started on first use);
    skips where PostgreSQL or its driver is not installed, saying which."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    name = postgres_server.database()
    yield postgres_server.url(name)
    postgres_server.drop(name)
