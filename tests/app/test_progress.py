"""The fine-tune panel: a progress bar from the steps the job expects, and a Cancel that
says "cancelled" once the job has stopped."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from lungvit.app.handlers_train import _expected_total, progress_bar
from lungvit.app.state import AppContext


def test_bar_shows_percent_and_steps() -> None:
    assert progress_bar(6, 10, width=10) == "▰▰▰▰▰▰▱▱▱▱ 60% (step 6 of 10)"
    assert progress_bar(0, 200, width=4) == "▱▱▱▱ 0% (step 0 of 200)"
    # Never past the end (early stopping ends sooner, never later):
    assert progress_bar(250, 200, width=4) == "▰▰▰▰ 100% (step 200 of 200)"
    assert progress_bar(5, None) == "" and progress_bar(5, 0) == ""  # unknown total: no bar


def test_total_comes_from_the_attempt_record() -> None:
    job = SimpleNamespace(resolved_config={"expected_steps": 120, "train": {"max_steps": 50}})
    assert _expected_total(job) == 120
    assert _expected_total(SimpleNamespace(resolved_config={"train": {"max_steps": 50}})) == 50
    assert _expected_total(SimpleNamespace(resolved_config=None)) is None


def _running_job(ctx: AppContext) -> int:
    """A job the store shows as running."""
    from lungvit.training.store import open_store

    with open_store(ctx.paths.db_url) as store:
        job_id = store.create_job({"train": {"data": "/x"}}, name="ft")
        store.start_attempt(job_id, resolved_config={"train": {}}, pid=1, hostname="h")
    return job_id


def test_cancel_answers_cancelled_once_the_job_has_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel waits for the job process to record the stop, then says so (not "requested")."""
    import threading
    import time

    from lungvit.app import handlers_train
    from lungvit.app.state import make_context
    from lungvit.training.store import open_store

    ctx = make_context(None, data_dir=tmp_path)
    job_id = _running_job(ctx)

    def job_process() -> None:  # what the job's watcher does: see the request, stop, record
        with open_store(ctx.paths.db_url) as store:
            while not store.is_cancel_requested(job_id):
                time.sleep(0.05)
            time.sleep(0.5)
            store.set_status(job_id, "cancelled")

    stopper = threading.Thread(target=job_process, daemon=True)
    stopper.start()
    assert handlers_train.cancel_job(ctx, job_id) == f"Job {job_id}: cancelled."
    stopper.join(timeout=10)

    # A job that does not stop within the wait is reported as still running.
    monkeypatch.setattr(handlers_train, "CANCEL_WAIT_S", 0.3)
    other = _running_job(ctx)
    assert handlers_train.cancel_job(ctx, other) == (
        f"Cancel requested for job {other} (now running).")
