"""Running a job in this process: the data, the Ray cluster, the heartbeat, the outcome.

:func:`run_job` is what the job process (``python -m lungvit.cli.job_process``) and
``lungvit train`` call. It prepares the data once, connects to Ray
(:mod:`lungvit.training.jobs.ray_cluster`), records the attempt, trains
(:mod:`lungvit.training.jobs.ray_train`) while a heartbeat thread beats, obeys cancel
requests and reports progress, and leaves the job succeeded, failed, cancelled or
interrupted. Torch, Lightning and Ray are imported when a job runs.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

from lungvit.core.errors import LungViTError
from lungvit.training.config import TrainConfig
from lungvit.training.jobs.request import (DEFAULT_HEARTBEAT_S, IN_PROCESS, JobError, JobRequest,
                                           store_url, train_config)
from lungvit.training.jobs.worker_hooks import check_importable
from lungvit.training.store import AttemptConflictError, JobRecord, JobStatus, Store, open_store
from lungvit.training.store.resumable import latest_resumable

log = logging.getLogger(__name__)

# Progress callback: (optimizer steps done, expected total or None, latest metric values).
ProgressFn = Callable[[int, "int | None", dict[str, float]], None]


class _Watcher(threading.Thread):
    """The job process's heartbeat: beats, obeys cancel requests and reports progress.

    Every second it checks for a cancel request (and reports progress); every
    ``interval_s`` it beats. A beat that finds the job no longer running in this process
    (the app declared it interrupted, perhaps resumed it elsewhere) stops the training:
    two processes must never train one job. To stop the training it calls ``abort``
    (which makes Ray abort the run), again after 15 s if the run is still going.
    """

    POLL_S = 1.0
    FORCE_AFTER_S = 15.0

    def __init__(self, store: Store, job_id: int, interval_s: float,
                 abort: Callable[[], None], progress: ProgressFn | None,
                 total_steps: int | None) -> None:
        super().__init__(name=f"job-{job_id}-heartbeat", daemon=True)
        self.store, self.job_id, self.interval_s = store, job_id, interval_s
        self.abort, self.progress, self.total_steps = abort, progress, total_steps
        self.cancelled = False
        self.lost = False  # another process declared this job interrupted
        self._done = threading.Event()
        self._aborted_at: float | None = None
        self._last_beat = time.monotonic()
        self._owner = {"pid": os.getpid(), "hostname": socket.gethostname()}

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)

    def run(self) -> None:
        while not self._done.wait(min(self.POLL_S, self.interval_s)):
            try:
                self._tick()
            except Exception:  # the store may be briefly unreachable: keep going
                log.exception("job %d: heartbeat failed", self.job_id)

    def _tick(self) -> None:
        now = time.monotonic()
        if self.store.is_cancel_requested(self.job_id):
            self._stop_training(now, cancel=True)
        elif now - self._last_beat >= self.interval_s:
            self._last_beat = now
            if not self.store.heartbeat(self.job_id, **self._owner):
                self._stop_training(now, cancel=False)
        if self.progress is not None:
            series = self.store.metrics(self.job_id, names=["train/loss", "val/loss"])
            latest = {name: values[-1][1] for name, values in series.items() if values}
            train = series.get("train/loss") or [(0, math.nan)]
            self.progress(train[-1][0], self.total_steps, latest)

    def _stop_training(self, now: float, cancel: bool) -> None:
        if self._aborted_at is None:
            self.cancelled, self.lost = cancel, not cancel
            log.warning("job %d: %s; stopping the workers", self.job_id,
                        "cancel requested" if cancel else "no longer running in this process")
        elif now - self._aborted_at < self.FORCE_AFTER_S:
            return
        else:  # Ray forces its exit at the third SIGINT
            self.abort()
            self.abort()
        self._aborted_at = now
        self.abort()


def _expected_steps(cfg: TrainConfig, n_train: int, workers: int) -> int:
    """Optimizer steps the run will take at most (early stopping may end it sooner)."""
    per_rank = math.ceil(n_train / workers)
    batches = max(1, math.ceil(per_rank / cfg.batch_size))
    accumulate = max(1, math.ceil(cfg.global_batch / (cfg.batch_size * workers))) \
        if cfg.global_batch else 1
    total = cfg.epochs * math.ceil(batches / accumulate)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def run_job(job_id: int, *, db_url: str | None = None,
            heartbeat_s: float = DEFAULT_HEARTBEAT_S, progress: ProgressFn | None = None,
            worker_logs: bool = True) -> JobStatus:
    """Run queued job ``job_id`` (or resume it if interrupted) in this process.

    Connects to Ray, trains, and leaves the job succeeded, failed, cancelled or
    interrupted. Must be called from the main thread (Ray aborts training by SIGINT).

    Args:
        job_id: the job.
        db_url: its store (default: the user's SQLite file).
        heartbeat_s: seconds between heartbeats.
        progress: called about every second with (step, expected steps, latest metrics).
        worker_logs: print the Ray workers' output here (else it stays in Ray's logs).

    Returns:
        The job's final status.
    """
    url = store_url(db_url)
    store = open_store(url)
    try:
        job = store.get_job(job_id)
        if job.status not in (JobStatus.QUEUED, JobStatus.INTERRUPTED):
            raise JobError(f"job {job_id} is {job.status}; only a queued or interrupted job "
                           "can be run")
        store.add_event(job_id, ("resuming" if job.status is JobStatus.INTERRUPTED
                                 else "starting") + f" the job (pid {os.getpid()})")
        try:
            return _run(store, job_id, JobRequest.from_dict(job.request_config), url,
                        heartbeat_s, progress, worker_logs, job.attempt)
        except AttemptConflictError as exc:
            # Another process runs this job now: leave it alone (never mark it failed).
            store.add_event(job_id, f"pid {os.getpid()} stopped: {exc}", "warning")
            raise JobError(str(exc)) from exc
        except BaseException as exc:
            _fail(store, job_id, exc)
            raise
    finally:
        store.close()


def _is_mine(job: JobRecord) -> bool:
    """Whether ``job`` is running in this process."""
    return job.status is JobStatus.RUNNING and (job.pid, job.hostname) == (
        os.getpid(), socket.gethostname())


def _fail(store: Store, job_id: int, exc: BaseException) -> None:
    """Leave the job failed (or interrupted, if the process itself was stopped), unless
    it is running in another process now."""
    try:
        job = store.get_job(job_id)
        if job.is_terminal or (job.status is JobStatus.RUNNING and not _is_mine(job)):
            return
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            # Stopped from outside (Ctrl-C, SIGTERM): resumable if it had started.
            store.set_status(job_id, (JobStatus.INTERRUPTED if job.status is JobStatus.RUNNING
                                      else JobStatus.CANCELLED).value)
            return
        text = (str(exc) if isinstance(exc, LungViTError)
                else "".join(traceback.format_exception(exc)))
        store.set_status(job_id, JobStatus.FAILED.value, error_text=text)
    except Exception:
        log.exception("job %d: could not record its failure", job_id)


def _run(store: Store, job_id: int, request: JobRequest, url: str, heartbeat_s: float,
         progress: ProgressFn | None, worker_logs: bool, seen_attempt: int) -> JobStatus:
    from lungvit.training.jobs import ray_cluster, ray_train
    from lungvit.training.learn.setup import build_datamodule, resolve_config

    request.validate()
    if request.worker_hooks is not None:
        try:
            check_importable(request.worker_hooks)
        except ValueError as exc:
            raise JobError(str(exc)) from None
    if request.mlflow_uri:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise JobError("--mlflow needs MLflow, which is not installed: pip install mlflow")
    cfg = resolve_config(train_config(job_id, request, url))
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    store.add_event(job_id, f"preparing the data ({cfg.variant}, {cfg.input_size} px)")
    dm = build_datamodule(cfg)  # decodes and caches once, here; the workers reuse it
    store.add_event(job_id, f"data: {len(dm.classes)} classes, train/val/test "
                            f"{'/'.join(str(len(dm.splits[s])) for s in ('train', 'val', 'test'))}"
                            f", {len(dm.unreadable)} unreadable")
    expected_steps = _expected_steps(cfg, len(dm.splits["train"]), request.workers)
    # Recorded with the attempt, so that a watcher (the app) can draw a progress bar.
    resolved = {**request.to_dict(), "train": cfg.to_dict(), "expected_steps": expected_steps}
    spec = ray_train.TrainSpec(
        train_config=cfg.to_dict(), job_id=job_id, db_url=url, workers=request.workers,
        use_gpu=request.use_gpu, resources_per_worker=request.worker_resources(),
        max_failures=request.max_failures, keep_best_k=cfg.keep_best_k,
        storage_path=str(Path(cfg.run_dir) / "ray"), name=f"job-{job_id}",
        launch_id=uuid.uuid4().hex, metrics_every_n_steps=request.metrics_every_n_steps,
        mlflow_uri=request.mlflow_uri, resume_from=latest_resumable(store, job_id),
        worker_hooks=request.worker_hooks, worker_hooks_args=request.worker_hooks_args,
        owner_pid=os.getpid(), owner_host=socket.gethostname(),
        in_process=request.in_process())
    if spec.in_process:  # Ray Train's local mode: no cluster to start or join
        runtime = contextlib.nullcontext(ray_cluster.Cluster(address=IN_PROCESS, local=True))
    else:
        runtime = ray_cluster.connect(ray_cluster.ClusterOptions(
            address=request.ray_address, log_to_driver=worker_logs,
            num_cpus=None if request.ray_address else request.local_cpus()))
    error: str | None = None
    with runtime as cluster:
        hardware = {"workers": request.workers, "resources_per_worker": spec.resources_per_worker,
                    "cluster": cluster.resources, "local_cluster": cluster.local,
                    "in_process": spec.in_process}
        attempt = store.start_attempt(job_id, resolved_config=resolved, hardware=hardware,
                                      ray_address=cluster.address, run_dir=cfg.run_dir,
                                      dataset_fingerprint=dm.fingerprint,
                                      expect_attempt=seen_attempt)
        log.info("job %d attempt %d on Ray at %s", job_id, attempt, cluster.address)
        watcher = _Watcher(store, job_id, heartbeat_s, ray_train.abort_training, progress,
                           expected_steps)
        previous = signal.signal(signal.SIGTERM, lambda *_: ray_train.abort_training())
        watcher.start()
        try:
            ray_train.train(spec)
        except (SystemExit, KeyboardInterrupt):
            if not (watcher.cancelled or watcher.lost):
                raise  # stopped from outside (Ctrl-C, SIGTERM): interrupted, resumable
        except ray_train.RayTrainingError as exc:
            error = str(exc)
        finally:
            watcher.stop()
            signal.signal(signal.SIGTERM, previous)
        # Written before the local Ray cluster shuts down (a few seconds): a cancelled job
        # shows as cancelled as soon as its workers are gone (Ray's abort stopped them).
        return _finish(store, job_id, watcher, error)


def _finish(store: Store, job_id: int, watcher: _Watcher, error: str | None) -> JobStatus:
    job = store.get_job(job_id)
    if watcher.lost or not _is_mine(job):
        # Declared interrupted (and perhaps resumed) elsewhere: its status is not ours.
        store.add_event(job_id, f"pid {os.getpid()} stopped: the job is {job.status} "
                                f"(pid {job.pid}) and no longer runs here", "warning")
    elif watcher.cancelled:
        store.set_status(job_id, JobStatus.CANCELLED.value)
    elif error is not None:
        store.set_status(job_id, JobStatus.FAILED.value, error_text=error)
    elif job.result_checkpoint_path is None:
        store.set_status(job_id, JobStatus.FAILED.value,
                         error_text="training ended without writing the final model")
    else:
        store.set_status(job_id, JobStatus.SUCCEEDED.value)
    return store.get_job(job_id).status
