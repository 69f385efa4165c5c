"""Two ``lungvit-app`` processes on one PostgreSQL store: a fine-tune started from one is
listed, watched and cancelled from the other (through each app's API, as its page does)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from lungvit.training.store import JobStatus, open_store  # noqa: E402

from .conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(1)
    return value


def serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def two_apps(tiny_checkpoint: Path, postgres_url: str, tmp_path: Path
             ) -> Iterator[tuple[str, str]]:
    """Two app processes (own data folders, own ports) on one PostgreSQL store."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "GRADIO_ANALYTICS_ENABLED": "False", "LUNGVIT_HOME": str(tmp_path / "home")}
    procs, urls = [], []
    for name in ("a", "b"):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "lungvit.app.main", "--model", str(tiny_checkpoint),
             "--db", postgres_url, "--data-dir", str(tmp_path / name), "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        urls.append(f"http://127.0.0.1:{port}/")
    try:
        for proc, url in zip(procs, urls):
            wait(lambda: serving(url) or proc.poll() is not None, 240, f"the app at {url}")
            assert proc.poll() is None, proc.stderr.read()[-3000:]
        yield urls[0], urls[1]
    finally:
        with open_store(postgres_url) as store:  # job processes run in sessions of their own
            for job in store.list_jobs():
                if job.pid:
                    kill_session(job.pid)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (a job and the Ray it started)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


def status_of(client: Client, job_id: int) -> str:
    return client.predict(job_id, api_name="/job_status")[0]


def test_a_job_started_in_one_app_is_watched_and_cancelled_from_the_other(
        two_apps: tuple[str, str], postgres_url: str, tmp_path: Path) -> None:
    from lungvit.cli.main import main as cli

    data = tmp_path / "ft"
    assert cli(["demo-data", str(data), "--per-class", "8", "--size", "48",
                "--classes", "lung-normal", "lung-covid", "lung-oct-cnv"]) == 0
    a, b = (Client(url, verbose=False) for url in two_apps)
    job_id, status = a.predict(str(data), None, 200, 1, False, 8, 1e-3,
                               "lungvit_tiny (from scratch)", 2000, api_name="/start_finetune")
    assert job_id > 0 and "queued" in status

    # The other app lists it and follows it while it trains.
    table = b.predict(api_name="/list_runs")[0]
    assert [r[:2] for r in table["data"] if r[0] == job_id] == [[job_id, "fine-tune ft"]]
    step = re.compile(rf"\*\*Job {job_id}: running\*\* \(attempt 1\), step (\d+)")
    wait(lambda: (m := step.search(status_of(b, job_id))) and int(m.group(1)) >= 2, 300,
         "the job to train a few steps, seen from the other app")
    # Cancel waits up to CANCEL_WAIT_S for the job to stop: the usual answer is "cancelled";
    # a job still stopping (a loaded machine) is reported as running.
    assert b.predict(job_id, api_name="/cancel_job") in (
        f"Job {job_id}: cancelled.", f"Cancel requested for job {job_id} (now running).")

    # The app that started it sees it stop, and so does the store.
    wait(lambda: f"**Job {job_id}: cancelled**" in status_of(a, job_id), 120,
         "the job to be cancelled, seen from the app that started it")
    with open_store(postgres_url) as store:
        job = store.get_job(job_id)
        messages = [e.message for e in store.events(job_id)]
    assert job.status is JobStatus.CANCELLED and job.cancel_requested
    assert "cancel requested" in messages and messages[-1] == "running -> cancelled"
    assert wait(lambda: not Path(f"/proc/{job.pid}").exists()
                or "Z" in Path(f"/proc/{job.pid}/stat").read_text().split(")")[-1][:3],
                60, "the job process to exit")
