"""``lungvit runs list|show|resume`` see a killed job as interrupted without the app."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, text

from lungvit.cli.main import main
from lungvit.training.jobs import runner as jobs
from lungvit.training.store import JobStatus, open_store


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_killed_job_is_interrupted_and_resumable_from_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with open_store(url) as store:
        killed = store.create_job({"train": {"data": "/scans/a"}}, name="killed")
        store.start_attempt(killed, resolved_config={}, pid=999_999_999, hostname="here")
        alive = store.create_job({"train": {"data": "/scans/b"}}, name="alive")
        store.start_attempt(alive, resolved_config={}, pid=1, hostname="here")
    # The killed job's process stopped beating ten minutes ago (SIGKILL: no last word).
    old = datetime.now(timezone.utc) - timedelta(minutes=10)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET heartbeat_at = :t, started_at = :t WHERE id = :i"),
                     {"t": old.replace(tzinfo=None), "i": killed})
    engine.dispose()

    code, out, err = _run(capsys, "runs", "list", "--db", url)
    assert code == 0
    status = {line.split()[1]: line.split()[2] for line in out.splitlines()[2:]}
    assert status == {"killed": "interrupted", "alive": "running"}
    assert "marked interrupted" in err and str(killed) in err
    code, out, _ = _run(capsys, "runs", "show", str(killed), "--db", url)
    assert code == 0 and f"job {killed} (killed): interrupted" in out

    started = []
    monkeypatch.setattr(jobs, "start_job_process", lambda job_id, **kw: (
        started.append(job_id) or SimpleNamespace(pid=4242)))
    code, out, err = _run(capsys, "runs", "resume", str(killed), "--db", url)
    assert code == 0, err
    assert started == [killed] and "resuming in process 4242" in out
    code, _, err = _run(capsys, "runs", "resume", str(alive), "--db", url)
    assert code == 3 and "only an interrupted job" in err  # its heartbeat is recent
    with open_store(url) as store:
        assert store.get_job(alive).status is JobStatus.RUNNING
