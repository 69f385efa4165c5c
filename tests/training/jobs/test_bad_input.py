"""A wrong --db URL, a PostgreSQL server that cannot be reached or refuses the login, a Ray
address that does not answer: each one line naming what to fix, exit code 3, and nothing
written to the store. (A cluster that refuses the token: test_multinode.py.)"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from lungvit.cli.main import main as lungvit
from tests._postgres import table_names as tables

FORMS = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LUNGVIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 3 with exactly one line on stderr (returned)."""
    code = lungvit(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, (code, err)
    return err[0]


def train(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(tmp_path / "m.safetensors"),
            "--workers", "2", *extra]



@pytest.mark.parametrize(("url", "says"), [
    ("foo://somewhere/x", "not foo; use " + FORMS),
    ("not a url", "is not a database URL"),
    ("mysql://u:s3cret@db.example/lungvit", "not mysql; use " + FORMS),
    ("postgresql+psycopg2://u:s3cret@db.example/lungvit", "write postgresql+psycopg://"),
    ("postgresql+psycopg://u:s3cret@db.example", "names no host or no database"),
])
@pytest.mark.parametrize("command", ["runs", "train"])
def test_a_wrong_db_url(url: str, says: str, command: str, png_data: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str], _home: Path) -> None:
    argv = (["runs", "list", "--db", url] if command == "runs"
            else train(png_data, tmp_path, "--db", url))
    line = one_line_error(capsys, argv)
    assert line.startswith(f"lungvit {command}: ") and says in line, line
    assert "s3cret" not in line  # passwords are never printed
    assert not _home.exists()  # no default store, no run folder


def test_postgresql_without_psycopg_names_the_extra(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what `import psycopg` meets if absent
    line = one_line_error(capsys, ["runs", "list", "--db",
                                   "postgresql://u:pw@127.0.0.1:5432/lungvit"])
    assert "pip install 'lungvit[postgres]'" in line, line


def test_an_unreachable_postgresql(png_data: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], _home: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://lungvit:pw@127.0.0.1:{port}/lungvit"
    for argv in (["runs", "list", "--db", url], train(png_data, tmp_path, "--db", url)):
        line = one_line_error(capsys, argv)
        assert f"cannot reach PostgreSQL at 127.0.0.1:{port} (connection refused)" in line
        assert "check that the server runs" in line and ":pw@" not in line
    assert not _home.exists()


def test_a_wrong_postgresql_password_or_database(postgres_server, postgres_url: str,
                                                 png_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    wrong = postgres_server.url(name, password="not-the-password")
    for argv in (["runs", "list", "--db", wrong], train(png_data, tmp_path, "--db", wrong)):
        line = one_line_error(capsys, argv)
        assert "refused user 'lungvit' (wrong password or user)" in line, line
        assert "not-the-password" not in line
    assert tables(postgres_url) == set()  # nothing written
    missing = postgres_server.url("no_such_db")
    line = one_line_error(capsys, ["runs", "list", "--db", missing])
    assert "has no database 'no_such_db': create it" in line, line


@pytest.mark.parametrize(("address", "says"), [
    ("127.0.0.1:{free}", "no Ray cluster answers at 127.0.0.1:{free} (Connection refused)"),
    ("nonsense", "--ray-address 'nonsense' is not HOST:PORT"),
    ("127.0.0.1:99999", "is not HOST:PORT"),
])
def test_a_ray_address_that_does_not_answer(address: str, says: str, png_data: Path,
                                            tmp_path: Path, postgres_url: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    free = free_port()
    address, says = address.format(free=free), says.format(free=free)
    for db in (f"sqlite:///{tmp_path / 'store' / 'lungvit.db'}", postgres_url):
        line = one_line_error(capsys, train(png_data, tmp_path, "--ray-address", address,
                                            "--db", db))
        assert line.startswith("lungvit train: ") and says in line, line
    assert not (tmp_path / "store").exists() and tables(postgres_url) == set()
