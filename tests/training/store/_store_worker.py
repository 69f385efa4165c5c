"""Child process for the store's multi-process tests (run as a script, never collected).

    python _store_worker.py MODE URL GO_FILE [ARGS...]

Every mode waits until GO_FILE exists (so the parent can start all children at once after
they have paid their import time), does its work, and prints one JSON line of results.
Exceptions are caught and reported in that line, never raised, so the parent sees them all.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from lungvit.training.store import AttemptConflictError, open_store


def _wait_for(go: Path) -> None:
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("go file never appeared")
        time.sleep(0.001)


def migrate(url: str) -> dict:
    store = open_store(url)
    return {"lock_retries": store.lock_retries}


def writer(url: str, job_id: str, tag: str, n: str) -> dict:
    """n metric rows (one transaction each) and an event every 10th row."""
    store = open_store(url)
    errors, metrics, events = [], 0, 0
    for step in range(int(n)):
        try:
            store.record_metrics(int(job_id), step, {f"writer{tag}/value": step})
            metrics += 1
            if step % 10 == 0:
                store.add_event(int(job_id), f"writer {tag} at {step}")
                events += 1
        except Exception as exc:  # reported to the parent, which fails the test
            errors.append(repr(exc))
    return {"errors": errors, "metrics": metrics, "events": events,
            "lock_retries": store.lock_retries}


def job(url: str, job_id: str, steps: str) -> dict:
    """What a training job does: start, heartbeat + metrics every step, checkpoints, finish."""
    store = open_store(url)
    errors, metrics, checkpoints = [], 0, 0
    try:
        store.start_attempt(int(job_id), resolved_config={"epochs": 1}, hardware={"cpu": 1})
        for step in range(int(steps)):
            try:
                store.heartbeat(int(job_id))
                store.record_metrics(int(job_id), step, {"train/loss": 1.0 / (step + 1),
                                                         "train/acc": step / 1000}, epoch=0)
                metrics += 2
                if step % 50 == 49:
                    store.record_checkpoint(int(job_id), version=checkpoints + 1,
                                            path=f"/ckpt/{checkpoints + 1}", sha256="0" * 64,
                                            metric_name="train/loss", metric_value=0.5,
                                            is_best=True)
                    checkpoints += 1
            except Exception as exc:
                errors.append(repr(exc))
        store.set_status(int(job_id), "succeeded")
    except Exception as exc:
        errors.append(repr(exc))
    return {"errors": errors, "metrics": metrics, "checkpoints": checkpoints,
            "lock_retries": store.lock_retries}


def restarter(url: str, job_id: str, pid: str, hostname: str, n: str) -> dict:
    """Count n restarts of the workers of a job running in process (pid, hostname)."""
    store = open_store(url)
    attempts, errors = [], []
    for _ in range(int(n)):
        try:
            attempts.append(store.restart_attempt(int(job_id), pid=int(pid),
                                                  hostname=hostname))
        except Exception as exc:
            errors.append(repr(exc))
    return {"attempts": attempts, "errors": errors, "lock_retries": store.lock_retries}


def claimer(url: str, job_id: str, expect: str) -> dict:
    """Try once to claim a job seen at attempt ``expect`` (what a resumed job process does)."""
    store = open_store(url)
    try:
        attempt = store.start_attempt(int(job_id), resolved_config={}, pid=os.getpid(),
                                      hostname="racer", expect_attempt=int(expect))
        return {"attempt": attempt, "pid": os.getpid(), "lock_retries": store.lock_retries}
    except AttemptConflictError as exc:
        return {"conflict": str(exc), "lock_retries": store.lock_retries}


def crash(url: str, job_id: str) -> dict:
    """Write steps forever, printing each step once its transaction has committed."""
    store = open_store(url)
    step = 0
    while True:
        store.record_metrics(int(job_id), step, {"a": step, "b": step, "c": step})
        print(f"committed {step}", flush=True)
        step += 1


if __name__ == "__main__":
    mode, url, go, *rest = sys.argv[1:]
    _wait_for(Path(go))
    try:
        result = globals()[mode](url, *rest)
    except Exception as exc:
        result = {"errors": [repr(exc)], "fatal": True, "traceback": traceback.format_exc()}
    print(json.dumps(result), flush=True)
