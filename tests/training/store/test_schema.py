"""Schema creation, versioning and migrations (on SQLite and on PostgreSQL), and each
backend's connection settings."""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, event

from lungvit.training.store import (LATEST_VERSION, SchemaVersionError, StoreError,
                                    default_db_path, default_db_url, open_store)
from lungvit.training.store.engine import MIGRATIONS, _enable_wal
from tests._postgres import table_names

from .conftest import sql

TABLES = {"schema_version", "jobs", "metrics", "checkpoints", "events"}
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])
POSTGRESQL_ONLY = pytest.mark.parametrize("backend", ["postgresql"])


def _file(url: str) -> str:
    return url.removeprefix("sqlite:///")


def _version_rows(url: str) -> list[tuple]:
    return sql(url, "SELECT id, version, updated_at FROM schema_version")


@contextmanager
def recorded_statements() -> Iterator[list[str]]:
    """The SQL statements every engine executes inside the block."""
    statements: list[str] = []
    record = lambda conn, cur, stmt, *a: statements.append(stmt)  # noqa: E731
    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def test_fresh_database_gets_every_table_and_the_latest_version(db_url: str, backend: str,
                                                                tmp_path: Path) -> None:
    url = db_url
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'sub' / 'dir' / 'lungvit.db'}"  # folders created too
    open_store(url).close()
    assert table_names(url) == TABLES
    rows = _version_rows(url)
    assert [(r[0], r[1]) for r in rows] == [(1, LATEST_VERSION)]
    assert LATEST_VERSION == len(MIGRATIONS) >= 1


def test_reopening_is_a_no_op(db_url: str) -> None:
    open_store(db_url).close()
    before = _version_rows(db_url)
    with recorded_statements() as statements:
        open_store(db_url).close()
    assert _version_rows(db_url) == before
    assert statements and "BEGIN IMMEDIATE" not in statements  # read the version, no more
    assert not [s for s in statements if s.split()[0].upper() in ("CREATE", "INSERT", "UPDATE")
                or "pg_advisory" in s]


@SQLITE_ONLY
def test_connection_settings(store) -> None:
    with store.engine.connect() as conn:
        pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("synchronous") == 1  # NORMAL
        assert pragma("busy_timeout") == 30_000


def test_wal_switch_is_retried_when_sqlite_skips_the_busy_handler() -> None:
    """Converting a new file to WAL can fail at once with "database is locked" when other
    processes open it at the same moment (seen about once in 50 six-process races)."""
    class Cursor:
        calls = 0

        def execute(self, sql: str) -> Cursor:
            Cursor.calls += 1
            if Cursor.calls < 3:
                raise sqlite3.OperationalError("database is locked")
            return self

        def fetchone(self) -> tuple[str]:
            return ("wal",)

    assert _enable_wal(Cursor()) == "wal" and Cursor.calls == 3


@POSTGRESQL_ONLY
def test_postgresql_connection_settings(store, db_url: str) -> None:
    """psycopg 3 underneath, a connect timeout (an unreachable server is an error, not a
    hang), and connections checked before use (a restarted server is survived)."""
    assert store.engine.dialect.driver == "psycopg"
    assert store.engine.pool._pre_ping  # noqa: SLF001
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW server_version_num").scalar() >= "100000"
        assert conn.connection.dbapi_connection.info.get_parameters()["connect_timeout"] == "10"
    # "postgresql://" (SQLAlchemy would take psycopg2) means psycopg 3 here.
    plain = open_store(db_url.replace("postgresql+psycopg://", "postgresql://"))
    assert plain.engine.dialect.driver == "psycopg"
    plain.close()


@POSTGRESQL_ONLY
def test_migrating_postgresql_takes_the_advisory_lock(db_url: str) -> None:
    with recorded_statements() as statements:
        open_store(db_url).close()
    lock = next(i for i, s in enumerate(statements) if "pg_advisory_xact_lock" in s)
    create = next(i for i, s in enumerate(statements) if s.lstrip().startswith("CREATE TABLE"))
    assert lock < create


@SQLITE_ONLY
def test_writes_begin_immediate_and_reads_deferred(store) -> None:
    job = store.create_job({})
    seen: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda conn, cur, stmt, *a: seen.append(stmt.split()[0].upper()
                                                         + (" IMMEDIATE" if "IMMEDIATE" in stmt
                                                            else "")))
    store.add_event(job, "x")
    assert seen[0] == "BEGIN IMMEDIATE"
    seen.clear()
    store.events(job)
    assert seen[0] == "BEGIN"


def test_a_reader_does_not_block_a_writer(store, db_url: str, backend: str) -> None:
    """WAL (MVCC on PostgreSQL): an open read transaction elsewhere does not stop a write
    from committing."""
    job = store.create_job({})
    if backend == "sqlite":
        con = sqlite3.connect(_file(db_url), isolation_level=None)
    else:
        import psycopg
        url = store.url
        con = psycopg.connect(host=url.host, port=url.port, user=url.username,
                              password=url.password, dbname=url.database, autocommit=True)
    run = lambda q: con.execute(q).fetchone()[0]  # noqa: E731
    con.execute("BEGIN" if backend == "sqlite" else "BEGIN ISOLATION LEVEL REPEATABLE READ")
    assert run("SELECT count(*) FROM events") == 1
    store.add_event(job, "while someone reads")
    assert run("SELECT count(*) FROM events") == 1  # its snapshot
    con.execute("COMMIT")
    assert run("SELECT count(*) FROM events") == 2
    con.close()


def test_timestamps_are_utc_aware(store) -> None:
    job = store.get_job(store.create_job({}))
    assert job.created_at.tzinfo is timezone.utc
    assert abs((datetime.now(timezone.utc) - job.created_at).total_seconds()) < 60


def test_missing_database_is_not_created_without_create(tmp_path: Path) -> None:
    path = tmp_path / "nothing.db"
    with pytest.raises(StoreError, match="no LungViT database"):
        open_store(f"sqlite:///{path}", create=False)
    assert not path.exists()


def test_empty_database_is_not_initialised_without_create(db_url: str, backend: str) -> None:
    if backend == "sqlite":
        Path(_file(db_url)).touch()
    with pytest.raises(StoreError, match="no LungViT store"):
        open_store(db_url, create=False)
    assert table_names(db_url) == set()


def test_newer_schema_is_refused(db_url: str) -> None:
    open_store(db_url).close()
    sql(db_url, "UPDATE schema_version SET version = :v", {"v": LATEST_VERSION + 1})
    with pytest.raises(SchemaVersionError, match="upgrade lungvit"):
        open_store(db_url)


def test_foreign_database_with_our_table_names_is_refused(db_url: str) -> None:
    sql(db_url, "CREATE TABLE jobs (x TEXT)")
    with pytest.raises(SchemaVersionError, match="not a LungViT store"):
        open_store(db_url)


def test_an_older_schema_is_upgraded(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database at version N runs exactly the migrations after N, once."""
    open_store(db_url).close()
    ran: list[int] = []
    extra = lambda conn: ran.append(1)  # noqa: E731 - a stand-in version LATEST + 1
    monkeypatch.setattr("lungvit.training.store.engine.MIGRATIONS", [*MIGRATIONS, extra])
    monkeypatch.setattr("lungvit.training.store.engine.LATEST_VERSION", LATEST_VERSION + 1)
    open_store(db_url).close()
    open_store(db_url).close()
    assert ran == [1]
    assert _version_rows(db_url)[0][1] == LATEST_VERSION + 1


def _race_to_create(url: str, workers) -> None:
    procs = [workers.start("migrate", url) for _ in range(5)]
    workers.go_when_ready()
    results = [workers.result(p) for p in procs]
    assert all("errors" not in r for r in results), results
    assert all(r["lock_retries"] == 0 for r in results), results
    assert table_names(url) == TABLES
    assert [r[:2] for r in _version_rows(url)] == [(1, LATEST_VERSION)]


@SQLITE_ONLY
@pytest.mark.parametrize("existing", [False, True], ids=["no-file", "zero-byte-file"])
def test_five_processes_create_the_schema_at_once(tmp_path: Path, workers, backend: str,
                                                  existing: bool) -> None:
    path = tmp_path / "race.db"
    if existing:
        path.touch()
    _race_to_create(f"sqlite:///{path}", workers)
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@POSTGRESQL_ONLY
def test_five_processes_create_the_schema_of_an_empty_postgresql_database_at_once(
        db_url: str, postgres_server, tmp_path: Path) -> None:
    """Three races, each on a new database: a process that read the catalog while another
    committed the schema once took the store for a foreign database (about 1 race in 10)."""
    from .conftest import Workers

    names = [db_url.rsplit("/", 1)[1]] + [postgres_server.database() for _ in range(2)]
    try:
        for k, name in enumerate(names):
            workers = Workers(tmp_path / f"go-{k}")
            try:
                _race_to_create(postgres_server.url(name), workers)
            finally:
                workers.kill_all()
    finally:
        for name in names[1:]:
            postgres_server.drop(name)


def test_default_location_follows_the_environment(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUNGVIT_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / ".local" / "share" / "lungvit" / "lungvit.db"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "lungvit" / "lungvit.db"
    monkeypatch.setenv("LUNGVIT_HOME", str(tmp_path / "lv"))
    assert default_db_url() == f"sqlite:///{tmp_path / 'lv' / 'lungvit.db'}"
    store = open_store()  # the default URL, created on first use
    store.create_job({})
    store.close()
    assert (tmp_path / "lv" / "lungvit.db").is_file()
