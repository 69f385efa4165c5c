"""Fine-tune jobs: one job is one OS process that trains on Ray and reports to the store.

The life of a job::

    request = JobRequest(train={"data": "/scans", "epochs": 12}, workers=2)
    job_id = launch_job(request)          # row "queued" + a detached process (survives the UI)
        # the process, ``python -m lungvit.cli.job_process --job-id N``, calls run_job(N):
        #   prepare the data -> connect to Ray -> attempt 1 "running" -> heartbeat every
        #   few seconds while Ray Train runs the workers -> "succeeded" with the model
    cancel_job(job_id)                    # the process aborts Ray within seconds: "cancelled"
    recover_interrupted()                 # at app start: dead processes -> "interrupted"
    resume_job(job_id)                    # a new process continues from the last checkpoint
    promote_result(job_id)                # "Use this model": its final model is the promoted one

These functions are the job API: the app and ``lungvit`` write to the store only through
them (``tests/test_store_writes.py`` checks it) and read it directly.

The request and the job's folders are :mod:`lungvit.training.jobs.request`; running a job
in a process (data, Ray, heartbeat, outcome) is :mod:`lungvit.training.jobs.execute`. A
worker that dies is restarted by Ray (``max_failures`` times) from the latest checkpoint;
the store counts that restart as the job's next attempt. A one-worker job may run in the
job process itself, in Ray Train's local mode (``runtime="in-process"``, or ``"auto"`` as the
app asks): no cluster to start, so it trains seconds after the button; a training error
there is retried the same way. Torch, Lightning and Ray are
imported when a job runs, not when this module is imported: the app imports it to launch
and recover jobs, which needs neither.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from lungvit.training.config import TrainConfig
from lungvit.training.jobs.execute import ProgressFn, run_job
from lungvit.training.jobs.ray_sessions import reap_job_session
from lungvit.training.jobs.request import (DEFAULT_HEARTBEAT_S, DEFAULT_STALE_AFTER_S, JOB_PROCESS,
                                           LOG_NAME, JobError, JobRequest, job_run_dir,
                                           request_from_cli, store_url)
from lungvit.training.store import CheckpointRecord, JobStatus, open_store

# The request's types and settings and the running are part of the job API as well.
__all__ = ["DEFAULT_HEARTBEAT_S", "DEFAULT_STALE_AFTER_S", "JobError", "JobRequest", "ProgressFn",
           "cancel_job", "comparison_line", "create_job", "launch_job", "promote_checkpoint",
           "promote_result", "recover_interrupted", "request_from_cli", "resume_job", "run_cli_job",
           "run_in_foreground", "run_job", "start_job_process"]


def create_job(request: JobRequest | Mapping[str, Any], *, db_url: str | None = None,
               name: str | None = None) -> int:
    """Queue a job in the store (nothing runs yet). Returns its id."""
    if not isinstance(request, JobRequest):
        request = JobRequest.from_dict(request)
    request.validate()
    with open_store(store_url(db_url)) as store:
        return store.create_job(request.to_dict(), name=name)


def start_job_process(job_id: int, *, db_url: str | None = None,
                      heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> subprocess.Popen[bytes]:
    """Start the detached process that runs (or resumes) job ``job_id``.

    It gets a session of its own, so it outlives the caller (and a closed UI), and writes
    its output to ``<run dir>/job.log``.
    """
    url = store_url(db_url)
    with open_store(url) as store:
        job = store.get_job(job_id)
        run_dir = job_run_dir(job_id, JobRequest.from_dict(job.request_config), url)
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / LOG_NAME
        cmd = [sys.executable, "-m", JOB_PROCESS, "--job-id", str(job_id), "--db", url,
               "--heartbeat", str(heartbeat_s)]
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        store.add_event(job_id, f"job process {proc.pid} started (log: {log_path})")
    return proc


def launch_job(request: JobRequest | Mapping[str, Any], *, db_url: str | None = None,
               name: str | None = None, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> int:
    """Queue a job and start its detached process. Returns the job's id at once."""
    job_id = create_job(request, db_url=db_url, name=name)
    start_job_process(job_id, db_url=db_url, heartbeat_s=heartbeat_s)
    return job_id


def recover_interrupted(db_url: str | None = None, *,
                        stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[int]:
    """Mark running jobs whose heartbeat stopped as interrupted (call at app start), and
    end the Ray processes their killed process left (:mod:`lungvit.training.jobs.ray_sessions`)."""
    with open_store(store_url(db_url)) as store:
        stale = store.mark_stale_interrupted(stale_after_s=stale_after_s)
        for job_id in stale:
            reap_job_session(store.get_job(job_id))
    return stale


def cancel_job(job_id: int, *, db_url: str | None = None) -> JobStatus:
    """Ask job ``job_id`` to stop (what the app's Cancel and ``lungvit runs cancel`` do).

    A queued or interrupted job is cancelled at once; a running one is flagged, and its
    process stops its workers within seconds; a finished one is left as it is.

    Returns:
        The job's status right after the request (``cancelled``, ``running`` while it
        stops, or the status it ended with).

    Raises:
        JobNotFoundError: there is no such job.
    """
    with open_store(store_url(db_url)) as store:
        return store.request_cancel(job_id)


def promote_checkpoint(job_id: int, version: int, *,
                       db_url: str | None = None) -> CheckpointRecord:
    """Mark checkpoint ``version`` of job ``job_id`` as its promoted one (and no other).

    Raises:
        JobNotFoundError: there is no such job, or it has no checkpoint ``version``.
    """
    with open_store(store_url(db_url)) as store:
        return store.promote(job_id, version)


def promote_result(job_id: int, *, db_url: str | None = None) -> CheckpointRecord | None:
    """Promote the checkpoint of job ``job_id``'s final model ("Use this model",
    ``lungvit runs promote ID``).

    Returns:
        The promoted checkpoint; None, with nothing changed, while the job has no final
        model or its final model is not among the checkpoints the store recorded.

    Raises:
        JobNotFoundError: there is no such job.
    """
    with open_store(store_url(db_url)) as store:
        job = store.get_job(job_id)
        finals = [c.version for c in store.checkpoints(job_id)
                  if job.result_checkpoint_path and c.path == job.result_checkpoint_path]
        return store.promote(job_id, finals[-1]) if finals else None


def resume_job(job_id: int, *, db_url: str | None = None,
               heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> subprocess.Popen[bytes]:
    """Start a process that continues interrupted job ``job_id`` from its last checkpoint
    (once what its killed process left of its Ray cluster is gone)."""
    with open_store(store_url(db_url)) as store:
        job = store.get_job(job_id)
    if job.status is not JobStatus.INTERRUPTED:
        raise JobError(f"job {job_id} is {job.status}; only an interrupted job can be resumed")
    reap_job_session(job)
    return start_job_process(job_id, db_url=db_url, heartbeat_s=heartbeat_s)


# ------------------------------------------------------------------------- entry points
def run_cli_job(cfg: TrainConfig, opts: argparse.Namespace) -> JobStatus:
    """``lungvit train`` on Ray: queue a job in the store and run it here.

    A wrong ``--db`` URL or a Ray cluster that does not answer (or refuses the token) is an
    error before anything is written to the store.

    Returns:
        The job's final status (``lungvit train`` exits with its code).
    """
    from lungvit.training.jobs.ray_address import check_address
    from lungvit.training.store.engine import parse_store_url

    url = store_url(opts.db)
    request = request_from_cli(cfg, opts)
    parse_store_url(url)
    address = opts.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
    job_id = create_job(request, db_url=url)
    where = f" --db {opts.db}" if opts.db else ""
    print(f"job {job_id}: `lungvit runs show {job_id}{where}` shows it in detail"
          + ("" if opts.verbose else " (`lungvit -v train ...` also shows the workers' output)"),
          file=sys.stderr)
    return run_in_foreground(job_id, db_url=url, worker_logs=opts.verbose)


def run_in_foreground(job_id: int, *, db_url: str | None = None,
                      worker_logs: bool = False) -> JobStatus:
    """Run (or resume) a job in this process with a progress bar; print the outcome.

    Returns:
        The job's final status.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=None, unit="step", desc=f"job {job_id}", dynamic_ncols=True)

    def show(step: int, total: int | None, latest: dict[str, float]) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.n = step
        bar.set_postfix({k.replace("/", "_"): f"{v:.3f}" for k, v in latest.items()},
                        refresh=True)

    try:
        status = run_job(job_id, db_url=db_url, progress=show, worker_logs=worker_logs)
    finally:
        bar.close()
    with open_store(store_url(db_url)) as store:
        job = store.get_job(job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    if job.result_checkpoint_path:
        acc = (job.final_metrics or {}).get("test/acc")
        shown = f" (test accuracy {acc:.1%})" if isinstance(acc, float) else ""
        print(f"model: {job.result_checkpoint_path}{shown}")
        verdict = comparison_line(job.final_metrics or {})
        if verdict:
            print(verdict)
    if job.error_text:
        print(job.error_text.strip().splitlines()[-1], file=sys.stderr)
    return status


def comparison_line(final: Mapping[str, Any]) -> str:
    """"better / worse than the base model by X points on N test scans" from a job's
    final metrics ("" when the job has no comparison)."""
    n, delta = final.get("compare/n_test"), final.get("compare/delta_acc")
    if not isinstance(n, (int, float)) or not isinstance(delta, (int, float)) or not n \
            or math.isnan(delta):
        return ""
    how = ("as accurate as the base model" if delta == 0 else
           f"{'better' if delta > 0 else 'worse'} than the base model by "
           f"{abs(delta) * 100:.1f} points of accuracy")
    return (f"{how} on {int(n)} test scans ({final.get('compare/base_acc', math.nan):.1%} -> "
            f"{final.get('compare/tuned_acc', math.nan):.1%})")
