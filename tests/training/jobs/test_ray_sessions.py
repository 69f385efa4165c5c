"""Ray processes a killed job left behind are ended when it is recovered or resumed."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, text

from lungvit.cli.main import main
from lungvit.training.store import open_store

DEAD_PID = 99_999_999  # above any pid_max: the job process that was killed
STRAY = ("import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as ray::DashboardAgent does\n"
         "print('ready', flush=True)\n"
         "time.sleep(300)\n")


@pytest.fixture
def processes() -> list[subprocess.Popen[bytes]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _session(root: Path, pid: int, gcs_port: int) -> Path:
    folder = root / f"session_2026-01-01_00-00-00_000001_{pid}"
    (folder / "logs").mkdir(parents=True)
    (folder / "gcs_server_port_abc123").write_text(str(gcs_port))
    return folder


def _start(processes: list, code: str, log: Path | None, **kw) -> subprocess.Popen[bytes]:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)
    processes.append(proc)
    if log:
        deadline = time.monotonic() + 60
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    return proc


def test_recovering_a_killed_job_ends_its_ray_processes_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: list,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    mine = _session(tmp_path / "ray", DEAD_PID, 40001)
    other = _session(tmp_path / "ray", DEAD_PID - 1, 40002)  # another cluster's
    stray = _start(processes, STRAY, mine / "logs" / "dashboard_agent.out")
    foreign = _start(processes, STRAY, other / "logs" / "dashboard_agent.out")
    reader = _start(processes, f"f = open({str(mine / 'logs' / 'dashboard_agent.out')!r})\n"
                               "import time; time.sleep(300)", None)  # `tail -f` of a log
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with open_store(url) as store:
        job = store.create_job({"train": {"data": "/scans/a"}})
        store.start_attempt(job, resolved_config={}, pid=DEAD_PID,
                            hostname=socket.gethostname(), ray_address="127.0.0.1:40001")
    engine = create_engine(url)
    with engine.begin() as conn:  # its process was killed ten minutes ago
        conn.execute(text("UPDATE jobs SET heartbeat_at = :t WHERE id = :i"),
                     {"t": datetime.now(timezone.utc).replace(tzinfo=None)
                      - timedelta(minutes=10), "i": job})
    engine.dispose()

    assert main(["runs", "list", "--db", url]) == 0
    assert stray.wait(timeout=30) is not None  # it ignored SIGTERM: killed
    assert foreign.poll() is None and reader.poll() is None
    assert "interrupted" in capsys.readouterr().out


def test_only_a_dead_local_job_is_reaped(tmp_path: Path, processes: list) -> None:
    from lungvit.training.jobs.ray_sessions import reap_job_session

    root = tmp_path / "ray"
    mine = _session(root, DEAD_PID, 40001)
    stray = _start(processes, STRAY, mine / "logs" / "raylet.out")
    here = socket.gethostname()
    for job in (SimpleNamespace(pid=DEAD_PID, hostname="elsewhere",
                                ray_address="127.0.0.1:40001"),
                SimpleNamespace(pid=DEAD_PID, hostname=here, ray_address="10.0.0.5:40001"),
                SimpleNamespace(pid=DEAD_PID, hostname=here, ray_address="127.0.0.1:49999")):
        assert reap_job_session(job, root=root) == []
    assert stray.poll() is None
    job = SimpleNamespace(pid=DEAD_PID, hostname=here, ray_address="127.0.0.1:40001")
    assert reap_job_session(job, root=root) == [stray.pid]
    assert stray.wait(timeout=30) is not None
