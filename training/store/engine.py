"""Engines, sessions and schema migrations of the tracking store.

SQLite (the default) is used the way several writing processes need it to be: WAL mode,
a 30 s busy timeout, ``synchronous=NORMAL``, foreign keys on, and every write transaction
opened with ``BEGIN IMMEDIATE`` so it takes the write lock up front. A deferred transaction
that reads first and writes later can fail with "database is locked" *without* waiting
(SQLite cannot upgrade a read snapshot that another writer has moved past); an immediate
one waits in the busy handler instead. Reads use a plain (deferred) ``BEGIN`` and never
block writers. To control BEGIN ourselves, pysqlite's own transaction handling is turned off
(``isolation_level = None``), as the SQLAlchemy SQLite dialect documentation describes.

PostgreSQL (``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB``, the psycopg 3 driver of
the ``lungvit[postgres]`` extra) gets none of the SQLite pragmas; write operations lock the
rows they change with ``SELECT ... FOR UPDATE``. No other backend is accepted: a URL that
is not one of these two, a server that cannot be reached or that refuses the login is a
:class:`StoreError` of one line that says what to fix.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import Session

from .errors import SchemaVersionError, StoreError
from .schema import Base, SchemaVersion, utcnow

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
_WRITE_OPTION = "lungvit_write"
# Engines a forked child inherited from its parent. They are kept referenced (never closed
# or garbage-collected) in the child: closing an inherited SQLite connection can checkpoint
# and delete the parent's WAL file under it.
_INHERITED: list[Engine] = []


def is_locked_error(exc: BaseException) -> bool:
    """True for SQLite's "database is locked" / "database is busy" errors."""
    if not isinstance(exc, OperationalError):
        return False
    msg = str(exc.orig).lower()
    return "database is locked" in msg or "database is busy" in msg


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return Path(db)


def _enable_wal(cur: sqlite3.Cursor) -> str:
    """Switch the database to WAL (a no-op once it is) and return the journal mode.

    Converting a new database to WAL upgrades a read lock to a write lock, which SQLite
    does without calling the busy handler (that could deadlock), so processes opening a
    brand-new file together can get "database is locked" here at once, whatever the busy
    timeout. Only then, the pragma is retried, within the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            return cur.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        if hasattr(sqlite3, "LEGACY_TRANSACTION_CONTROL"):  # Python 3.12+
            dbapi_conn.autocommit = sqlite3.LEGACY_TRANSACTION_CONTROL
        # Take BEGIN away from pysqlite; the "begin" hook below emits it. COMMIT and
        # ROLLBACK still go through the driver.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = _enable_wal(cur)
            if mode.lower() not in ("wal", "memory"):
                logger.warning("SQLite refused WAL mode (journal_mode=%s); concurrent "
                               "writers will contend more", mode)
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


URL_FORMS = ("sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE")
POSTGRES_EXTRA = "pip install 'lungvit[postgres]'"
CONNECT_TIMEOUT_S = 10


def shown(url: str | URL) -> str:
    """``url`` with its password hidden (for messages)."""
    return url.render_as_string(hide_password=True) if isinstance(url, URL) else str(url)


def parse_store_url(url: str | URL) -> URL:
    """Check that ``url`` names a store LungViT can use: a SQLite file (or memory) or a
    PostgreSQL database through psycopg 3 (``postgresql://`` is taken to mean that).

    Raises:
        StoreError: a malformed URL, another backend or driver, or psycopg not installed.
    """
    if isinstance(url, URL):
        u = url
    else:
        try:
            u = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise StoreError(f"--db {url!r} is not a database URL ({exc}); use "
                             f"{URL_FORMS}") from None
    backend, _, driver = u.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return u
    if backend != "postgresql" or driver not in ("", "psycopg", "psycopg2"):
        raise StoreError(f"--db {shown(u)!r}: the store runs on SQLite or PostgreSQL, not "
                         f"{u.drivername}; use {URL_FORMS}")
    if not driver:  # SQLAlchemy's own default would be psycopg2
        u = u.set(drivername="postgresql+psycopg")
    elif driver == "psycopg2":
        raise StoreError(f"--db {shown(u)!r}: LungViT talks to PostgreSQL through psycopg 3; "
                         "write postgresql+psycopg:// (or postgresql://)")
    if not u.host or not u.database:
        raise StoreError(f"--db {shown(u)!r} names no host or no database; use {URL_FORMS}")
    try:
        import psycopg  # noqa: F401 - the optional driver (lungvit[postgres])
    except ImportError:
        raise StoreError(f"a PostgreSQL store needs the psycopg driver, which is not "
                         f"installed: {POSTGRES_EXTRA}") from None
    return u


def describe_connect_error(url: URL, exc: DBAPIError) -> str:
    """One line that says why the store at ``url`` could not be opened and what to fix."""
    detail = " ".join(str(exc.orig).split()) if exc.orig is not None else str(exc)
    lowered = detail.lower()
    where = f"PostgreSQL at {url.host}:{url.port or 5432}"
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return (f"{where} refused user {url.username!r} (wrong password or user): fix the "
                f"user and password in --db {shown(url)}")
    if f'database "{url.database}" does not exist' in detail:
        return (f"{where} has no database {url.database!r}: create it (createdb "
                f"{url.database}) or fix --db {shown(url)}")
    if "no pg_hba.conf entry" in lowered or "not permitted" in lowered:
        return f"{where} does not let user {url.username!r} in (pg_hba.conf): {detail[:200]}"
    why = next((w for w in ("connection refused", "timeout expired", "could not translate "
                            "host name", "no route to host") if w in lowered), detail[:200])
    return (f"cannot reach {where} ({why}): check that the server runs and the host and "
            f"port of --db {shown(url)}")


def create_store_engine(url: str | URL, *, create: bool = True) -> Engine:
    """An engine for ``url`` with the store's connection settings.

    Args:
        url: a SQLite or PostgreSQL URL (:func:`parse_store_url`). SQLite file URLs get the
            pragmas described above, and the file's folder is created when ``create`` is
            true.
        create: when false, a SQLite file that does not exist is an error, not created.

    Returns:
        The engine; write sessions bind to ``engine.execution_options(lungvit_write=True)``.
    """
    u = parse_store_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True,
                             connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    path = _sqlite_file(u)
    if path is not None:
        if not path.exists():
            if not create:
                raise StoreError(f"no LungViT database at {path}; run a fine-tune first or "
                                 "pass the right --db")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the SQLite store's folder {path.parent} "
                                 f"({exc.strerror}): fix the path in --db") from None
    engine = create_engine(u)
    _install_sqlite_hooks(engine)
    return engine


class Database:
    """The engine of one URL, created lazily in each process, and short-lived sessions.

    Safe to share between threads (each operation takes its own session and pooled
    connection) and across ``fork``: a child process notices the pid change and opens its
    own engine instead of reusing the parent's connections.
    """

    def __init__(self, url: str | URL, *, create: bool = True) -> None:
        self.url = parse_store_url(url)
        self._create = create
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._binds: tuple[Engine, Engine] | None = None  # (read, write)

    def _current_binds(self) -> tuple[Engine, Engine]:
        binds = self._binds
        if binds is not None and self._pid == os.getpid():
            return binds
        with self._lock:
            if self._binds is not None and self._pid != os.getpid():
                _INHERITED.append(self._binds[0])
                self._binds = None
            if self._binds is None:
                engine = create_store_engine(self.url, create=self._create)
                self._binds = (engine, engine.execution_options(**{_WRITE_OPTION: True}))
                self._pid = os.getpid()
            return self._binds

    @property
    def engine(self) -> Engine:
        """This process's engine."""
        return self._current_binds()[0]

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session in a read transaction (deferred BEGIN on SQLite)."""
        with Session(self._current_binds()[0], expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in a write transaction that holds the write lock from its start."""
        with Session(self._current_binds()[1], expire_on_commit=False) as s, s.begin():
            yield s

    def dispose(self) -> None:
        """Close this process's pooled connections."""
        with self._lock:
            if self._binds is not None and self._pid == os.getpid():
                self._binds[0].dispose()
            self._binds, self._pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (e.g. handed to a Ray worker): the engine is rebuilt on first use.
        return {"url": self.url, "_create": self._create}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], create=state["_create"])  # type: ignore[misc]


# --- migrations -------------------------------------------------------------------------
#
# MIGRATIONS[i] brings the schema from version i to version i + 1. A new database is built
# by the first one, ``create_all`` of the current models, and stamped with the latest
# version directly; later migrations only ever run on databases created by older releases.
# To change the schema: edit the models, append a function here that alters an existing
# database the same way, and add a test that upgrades a database of the previous version.

def _v1_create_all(conn: Connection) -> None:
    Base.metadata.create_all(conn)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1_create_all]
LATEST_VERSION = len(MIGRATIONS)
_ADVISORY_LOCK_KEY = 0x4C756E67  # "Lung": serialises migrations on PostgreSQL


def _current_version(conn: Connection) -> int:
    insp = inspect(conn)
    if not insp.has_table(SchemaVersion.__tablename__):
        ours = [t for t in Base.metadata.tables if insp.has_table(t)]
        if ours:
            raise SchemaVersionError(
                f"{conn.engine.url!r} has tables {ours} but no schema_version table: it is "
                "not a LungViT store (or was damaged); use another database")
        return 0
    version = conn.execute(select(SchemaVersion.version).where(SchemaVersion.id == 1))
    return version.scalar_one_or_none() or 0


def _check_not_newer(version: int, url: URL) -> None:
    if version > LATEST_VERSION:
        raise SchemaVersionError(
            f"the database {url!r} has schema version {version}, newer than this LungViT "
            f"understands ({LATEST_VERSION}); upgrade lungvit")


def migrate(db: Database, *, create: bool = True) -> int:
    """Bring the database's schema to ``LATEST_VERSION``; safe when processes race.

    A quick read decides whether anything is needed. If so, the upgrade runs in one write
    transaction (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL) that reads
    the version again after taking the lock, so of several processes starting on an empty
    database exactly one creates the schema and the others find it done.

    Args:
        db: the database.
        create: when false, an empty database is an error instead of being initialised.

    Returns:
        The schema version after the call (always ``LATEST_VERSION``).
    """
    # One snapshot for the whole check. Under PostgreSQL's READ COMMITTED each statement sees
    # what was committed before it, so another process's migration committing between
    # "is there a schema_version table?" and "are there tables of ours?" would look like a
    # foreign database. (SQLite's read transaction is a snapshot already.)
    options = ({"isolation_level": "REPEATABLE READ"}
               if db.url.get_backend_name() == "postgresql" else {})
    with db.read() as s:
        version = _current_version(s.connection(execution_options=options))
    _check_not_newer(version, db.url)
    if version == LATEST_VERSION:
        return version
    if version == 0 and not create:
        raise StoreError(f"{db.url!r} holds no LungViT store")
    with db.write() as s:
        conn = s.connection()
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
        version = _current_version(conn)  # again, now that we hold the lock
        _check_not_newer(version, db.url)
        if version == LATEST_VERSION:
            return version
        if version == 0:
            MIGRATIONS[0](conn)
            s.add(SchemaVersion(id=1, version=LATEST_VERSION, updated_at=utcnow()))
        else:
            for step in MIGRATIONS[version:]:
                step(conn)
            row = s.get(SchemaVersion, 1)
            assert row is not None
            row.version, row.updated_at = LATEST_VERSION, utcnow()
        logger.info("tracking store %r: schema version %d -> %d", db.url, version,
                    LATEST_VERSION)
    return LATEST_VERSION
