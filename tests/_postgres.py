"""A throw-away PostgreSQL server for the tests: Debian's ``postgresql`` binaries, started
with initdb + pg_ctl in a temporary folder, listening on 127.0.0.1 on a free port only.

The server keeps its unix socket in its own data folder (never ``/var/run/postgresql``),
takes passwords over TCP (scram-sha-256, so a wrong password is refused as it would be on a
real server) and runs as the ``postgres`` user when the tests run as root (initdb refuses
root). Each test gets a database of its own, dropped afterwards.
"""
from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "lungvit"


def find_bin_dir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest
    ``/usr/lib/postgresql/<version>/bin``."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name)
                      if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


def unavailable_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install 'lungvit[postgres]'"
    if find_bin_dir() is None:
        return ("PostgreSQL's server (initdb, pg_ctl) is not installed: "
                "apt-get install postgresql (.ci/run does this)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run the server as"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in a temporary folder; ``start()``, ``database()``, ``stop()``."""

    def __init__(self) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(unavailable_reason())
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="lungvit-pg-"))
        self.data = self.root / "data"
        self.password = secrets.token_hex(12)
        self.port = 0
        self._names = itertools.count(1)
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: the server runs as postgres
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr)[-2000:]}")

    def start(self) -> PostgresServer:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER,
                  f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        pwfile.unlink()
        for attempt in range(3):  # the free port may be taken in between: try another
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                       f"-c unix_socket_directories={self.data} -c fsync=off "
                       "-c max_connections=300 -c shared_buffers=32MB")
            try:
                self._run(str(self.bin / "pg_ctl"), "start", "-w", "-t", "60",
                          "-D", str(self.data), "-l", str(self.root / "server.log"),
                          "-o", options)
                return self
            except RuntimeError:
                if attempt == 2:
                    raise RuntimeError("PostgreSQL did not start: "
                                       + self.log()[-2000:]) from None
        return self

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        """A SQLAlchemy URL of ``database`` on this server (psycopg 3 driver)."""
        pw = self.password if password is None else password
        return f"postgresql+psycopg://{USER}:{pw}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER,
                             password=self.password, dbname="postgres",
                             autocommit=True) as con:
            con.execute(sql)

    def database(self) -> str:
        """Create a new, empty database; returns its name."""
        name = f"test_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop(self, name: str) -> None:
        """Drop a database, closing whatever is still connected to it."""
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.data.exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "stop", "-m", "fast", "-w",
                          "-D", str(self.data), timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self.bin / "pg_ctl"), "stop", "-m", "immediate",
                          "-D", str(self.data), timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def table_names(url: str) -> set[str]:
    """The tables of the database at ``url`` (SQLite or PostgreSQL), read on a fresh
    connection (what another process would see)."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
