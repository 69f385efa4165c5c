"""``lungvit-app`` refuses unsafe options and serves its page from a subprocess."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lungvit.app.main import build_parser, main, stop_app
from lungvit.cli.exit_codes import USAGE as EXIT_USAGE

from .conftest import free_port


def test_help_names_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--model", "--db", "--data-dir", "--auth"):
        assert option in out
    assert build_parser().parse_args([]).host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.20.30.40"])
def test_non_loopback_needs_auth(host: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--host", host]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--auth" in err and host in err


def test_bad_auth_and_model_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--auth", "nopassword"]) == EXIT_USAGE
    assert main(["--model", str(tmp_path / "missing.safetensors")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "USER:PASSWORD" in err and "no such model file" in err


def test_console_script_refuses_public_host_without_auth() -> None:
    proc = subprocess.run([sys.executable, "-m", "lungvit.app.main", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE
    assert "refusing" in proc.stderr and "Traceback" not in proc.stderr


def test_launcher_serves_page_and_prints_url(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """...with owner-only files under the usual umask, the upload caches of app processes
    that no longer run removed at start, and its own removed on SIGTERM."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    work = tmp_path / "data" / "tmp"
    stale = work / "gradio-99999999"  # above any pid_max: a process that no longer runs
    (stale / "upload").mkdir(parents=True)
    (stale / "upload" / "patient.dcm").write_bytes(b"scan")
    alive = work / f"gradio-{os.getpid()}"  # a running process's: kept
    alive.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lungvit.app.main", "--port", str(port), "--model",
         str(tiny_checkpoint), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, umask=0o022)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    status = r.status
                    page = r.read().decode("utf-8", "replace")
                break
            except OSError:
                time.sleep(0.5)
        assert status == 200, "the app did not serve its page"
        while time.monotonic() < deadline and f"localhost:{port}" not in "".join(lines):
            time.sleep(0.2)
        assert "LungViT" in page
        own = work / f"gradio-{proc.pid}"
        assert own.is_dir(), "the upload cache should live under the data directory"
        assert not stale.exists() and alive.is_dir()
        mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
        assert (mode(tmp_path / "data"), mode(work), mode(own)) == (0o700,) * 3
        assert mode(tmp_path / "data" / "lungvit.db") == 0o600
    finally:
        code = stop_app(proc, sig=signal.SIGTERM)
        reader.join(timeout=10)
    out = "".join(lines)
    assert f"http://localhost:{port}/" in out
    assert code == 0, out[-3000:]
    assert [p.name for p in work.glob("gradio-*")] == [alive.name], "upload cache not cleaned"


def test_stale_upload_caches_are_removed_unless_in_use(tmp_path: Path) -> None:
    from lungvit.app.main import remove_stale_uploads

    dead = tmp_path / "gradio-99999999"
    in_use = tmp_path / "gradio-99999998"  # holds the uploaded dataset of a running job
    running = tmp_path / f"gradio-{os.getpid()}"
    other = tmp_path / "gradio-notapid"
    for folder in (dead / "lungvit", in_use / "lungvit" / "datasets" / "d", running, other):
        folder.mkdir(parents=True)
    removed = remove_stale_uploads(tmp_path, keep=[in_use / "lungvit" / "datasets" / "d"])
    assert removed == [dead] and not dead.exists()
    assert in_use.is_dir() and running.is_dir() and other.is_dir()


@pytest.mark.parametrize("url", ["foo://somewhere/x", "not a url"])
def test_a_wrong_store_url_is_one_line_and_exit_3(url: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """As for the lungvit CLI: the app names what to fix in one line and writes nothing."""
    monkeypatch.setenv("LUNGVIT_HOME", str(tmp_path / "home"))
    assert main(["--db", url, "--port", "0"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lungvit-app: --db") and "use sqlite" in err[0], err
    assert not list((tmp_path / "home").rglob("*.db"))
