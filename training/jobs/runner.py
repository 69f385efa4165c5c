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

A worker that dies is restarted by Ray (``max_failures`` times) from the latest checkpoint;
the store counts that restart as the job's next attempt. Torch, Lightning and Ray are
imported when a job runs, not when this module is imported: the app imports it to launch
and recover jobs, which needs neither.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy.engine import make_url

from lungvit.core.errors import LungViTError
from lungvit.training.config import TrainConfig
from lungvit.core.configs import unknown_keys
from lungvit.training.jobs.ray_sessions import reap_job_session
from lungvit.training.jobs.worker_hooks import check_importable, is_module_name
from lungvit.training.store import (AttemptConflictError, CheckpointRecord, JobRecord,
                                    JobStatus, Store, default_data_dir, default_db_url,
                                    open_store)
from lungvit.training.store.resumable import latest_resumable

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_STALE_AFTER_S = 60.0
LOG_NAME = "job.log"
# The job process's module (it calls run_job); named, not imported: training imports no cli.
JOB_PROCESS = "lungvit.cli.job_process"
MODEL_NAME = "model.safetensors"
# Progress callback: (optimizer steps done, expected total or None, latest metric values).
ProgressFn = Callable[[int, "int | None", dict[str, float]], None]


class JobError(LungViTError):
    """A job cannot be created, run or resumed (the message says why)."""


@dataclass
class JobRequest:
    """What a fine-tune job is asked to do: the training and how to run it on Ray.

    Args:
        train: :class:`~lungvit.training.config.TrainConfig` fields (``data`` is required;
            ``out`` and ``run_dir`` default to the job's own folder).
        workers: data-parallel Ray Train workers.
        use_gpu: give each worker a GPU.
        cpus_per_worker: CPUs Ray reserves per worker.
        gpus_per_worker: GPUs per worker when ``use_gpu`` (default 1).
        resources_per_worker: further custom Ray resources per worker.
        ray_address: an existing Ray cluster; None: ``RAY_ADDRESS``, else a local cluster.
        num_cpus: CPUs of the local cluster (None: enough for the workers and the driver).
        max_failures: times Ray may restart the workers after a failure.
        metrics_every_n_steps: store the training loss and learning rate every N steps.
        mlflow_uri: also log metrics to this MLflow tracking URI (needs ``mlflow``).
        worker_hooks: tests only: a module (a dotted name, importable in the job process
            and its workers) whose ``install`` each Ray Train worker calls before it trains;
            see :mod:`lungvit.training.jobs.worker_hooks`.
        worker_hooks_args: that module's settings (JSON).
    """

    train: dict[str, Any]
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    ray_address: str | None = None
    num_cpus: int | None = None
    max_failures: int = 1
    metrics_every_n_steps: int = 1
    mlflow_uri: str | None = None
    worker_hooks: str | None = None
    worker_hooks_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Paths become strings: the request is stored as JSON.
        self.train = {k: str(v) if isinstance(v, PurePath) else v
                      for k, v in self.train.items()}

    def validate(self) -> JobRequest:
        """Raise :class:`JobError` naming every setting that cannot work; return self."""
        problems = []
        if not self.train.get("data"):
            problems.append("train.data (the folder of class folders) is required")
        unknown = unknown_keys(TrainConfig, self.train)
        if unknown:
            problems.append(f"unknown training settings: {', '.join(unknown)}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, not {self.workers}")
        if self.max_failures < 0:
            problems.append(f"max_failures must be >= 0, not {self.max_failures}")
        if self.metrics_every_n_steps < 1:
            problems.append(f"metrics_every_n_steps must be >= 1, not "
                            f"{self.metrics_every_n_steps}")
        if self.cpus_per_worker <= 0:
            problems.append(f"cpus_per_worker must be > 0, not {self.cpus_per_worker}")
        if self.worker_hooks is not None and not is_module_name(self.worker_hooks):
            problems.append(f"worker_hooks must be a dotted module name such as pkg.module, "
                            f"not {self.worker_hooks!r}")
        if problems:
            raise JobError("invalid job request: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.worker_hooks is None:  # a tests-only seam stays out of users' records
            del data["worker_hooks"], data["worker_hooks_args"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobRequest:
        """Rebuild a request; unknown keys are an error rather than silently ignored."""
        data = dict(data)
        # Requests stored by earlier versions name a tests-only setting, unset outside tests.
        if "fault_injection" in data and data["fault_injection"] is None:
            del data["fault_injection"]
        unknown = unknown_keys(cls, data)
        if unknown:
            raise JobError(f"unknown job request keys: {', '.join(unknown)}")
        return cls(**data)

    def worker_resources(self) -> dict[str, float]:
        resources = {"CPU": float(self.cpus_per_worker), **self.resources_per_worker}
        if self.use_gpu:
            resources["GPU"] = float(self.gpus_per_worker or 1)
        return resources

    def local_cpus(self) -> int:
        """CPUs for a local cluster: the workers' reservations plus one for the driver."""
        if self.num_cpus is not None:
            return self.num_cpus
        return math.ceil(self.workers * self.cpus_per_worker) + 1


# ----------------------------------------------------------------------------- folders
def jobs_root(db_url: str) -> Path:
    """Where jobs keep their folders: beside a SQLite store, else in the data directory."""
    url = make_url(db_url)
    if url.drivername.startswith("sqlite") and url.database not in (None, "", ":memory:"):
        return Path(url.database).expanduser().resolve().parent / "runs"
    return default_data_dir() / "runs"


def job_run_dir(job_id: int, request: JobRequest, db_url: str) -> Path:
    """The job's run folder: ``train.run_dir`` if the request names one."""
    given = request.train.get("run_dir")
    return Path(given) if given else jobs_root(db_url) / f"job-{job_id}"


def train_config(job_id: int, request: JobRequest, db_url: str) -> TrainConfig:
    """The request's :class:`TrainConfig`, with the job's folders and device filled in."""
    values = dict(request.train)
    run_dir = job_run_dir(job_id, request, db_url)
    values["run_dir"] = str(run_dir)
    values["out"] = values.get("out") or str(run_dir / MODEL_NAME)
    values["accelerator"] = "gpu" if request.use_gpu else "cpu"
    return TrainConfig.from_dict(values)


# -------------------------------------------------------------------- creating, launching
def _url(db_url: str | None) -> str:
    return db_url or default_db_url()


def create_job(request: JobRequest | Mapping[str, Any], *, db_url: str | None = None,
               name: str | None = None) -> int:
    """Queue a job in the store (nothing runs yet). Returns its id."""
    if not isinstance(request, JobRequest):
        request = JobRequest.from_dict(request)
    request.validate()
    with open_store(_url(db_url)) as store:
        return store.create_job(request.to_dict(), name=name)


def start_job_process(job_id: int, *, db_url: str | None = None,
                      heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> subprocess.Popen[bytes]:
    """Start the detached process that runs (or resumes) job ``job_id``.

    It gets a session of its own, so it outlives the caller (and a closed UI), and writes
    its output to ``<run dir>/job.log``.
    """
    url = _url(db_url)
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
    with open_store(_url(db_url)) as store:
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
    with open_store(_url(db_url)) as store:
        return store.request_cancel(job_id)


def promote_checkpoint(job_id: int, version: int, *,
                       db_url: str | None = None) -> CheckpointRecord:
    """Mark checkpoint ``version`` of job ``job_id`` as its promoted one (and no other).

    Raises:
        JobNotFoundError: there is no such job, or it has no checkpoint ``version``.
    """
    with open_store(_url(db_url)) as store:
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
    with open_store(_url(db_url)) as store:
        job = store.get_job(job_id)
        finals = [c.version for c in store.checkpoints(job_id)
                  if job.result_checkpoint_path and c.path == job.result_checkpoint_path]
        return store.promote(job_id, finals[-1]) if finals else None


def resume_job(job_id: int, *, db_url: str | None = None,
               heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> subprocess.Popen[bytes]:
    """Start a process that continues interrupted job ``job_id`` from its last checkpoint
    (once what its killed process left of its Ray cluster is gone)."""
    with open_store(_url(db_url)) as store:
        job = store.get_job(job_id)
    if job.status is not JobStatus.INTERRUPTED:
        raise JobError(f"job {job_id} is {job.status}; only an interrupted job can be resumed")
    reap_job_session(job)
    return start_job_process(job_id, db_url=db_url, heartbeat_s=heartbeat_s)


# -------------------------------------------------------------------------- running
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
    url = _url(db_url)
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
        owner_pid=os.getpid(), owner_host=socket.gethostname())
    opts = ray_cluster.ClusterOptions(address=request.ray_address,
                                       num_cpus=None if request.ray_address
                                       else request.local_cpus(), log_to_driver=worker_logs)
    error: str | None = None
    with ray_cluster.connect(opts) as cluster:
        hardware = {"workers": request.workers, "resources_per_worker": spec.resources_per_worker,
                    "cluster": cluster.resources, "local_cluster": cluster.local}
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


# ------------------------------------------------------------------------- entry points
def request_from_cli(cfg: TrainConfig, opts: argparse.Namespace) -> JobRequest:
    """The job request of ``lungvit train``: its TrainConfig plus the job options of
    :func:`lungvit.cli.runs_cmd.add_job_arguments`."""
    request = JobRequest(train=cfg.to_dict(), workers=opts.workers or 1,
                         use_gpu=bool(opts.gpu), ray_address=opts.ray_address,
                         mlflow_uri=opts.mlflow)
    if opts.max_failures is not None:
        request.max_failures = opts.max_failures
    if opts.cpus_per_worker is not None:
        request.cpus_per_worker = opts.cpus_per_worker
    return request.validate()


def run_cli_job(cfg: TrainConfig, opts: argparse.Namespace) -> JobStatus:
    """``lungvit train`` on Ray: queue a job in the store and run it here.

    A wrong ``--db`` URL or a Ray cluster that does not answer (or refuses the token) is an
    error before anything is written to the store.

    Returns:
        The job's final status (``lungvit train`` exits with its code).
    """
    from lungvit.training.jobs.ray_address import check_address
    from lungvit.training.store.engine import parse_store_url

    url = _url(opts.db)
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
    with open_store(_url(db_url)) as store:
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
