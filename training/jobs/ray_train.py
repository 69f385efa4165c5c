"""Ray Train: the Lightning training of a job on the workers of a Ray cluster.

:func:`train` runs :func:`lungvit.training.learn.fit.fit` as a Ray Train ``TorchTrainer``:
every worker calls ``fit`` with Ray's DDP strategy and environment plugin, reports a
resumable checkpoint to Ray after each validation (:mod:`.ray_report`; Ray keeps the best
``keep_best_k`` by validation loss), and rank 0 writes metrics and checkpoints to the tracking store. The
cluster it runs on comes from :func:`lungvit.training.jobs.ray_cluster.connect`.

A one-worker job may instead run in the job process itself, in Ray Train's local mode
(``ScalingConfig(num_workers=0)``, ``TrainSpec.in_process``): no cluster, no actors, the
same ``ray.train`` calls. Ray keeps no checkpoints in that mode, so the worker writes them
to the same folders Ray would (keeping the best ``keep_best_k``), and :func:`train` itself
restarts a failed training up to ``max_failures`` times from the latest one, as Ray restarts
its workers.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend

from lungvit.core.errors import LungViTError
from lungvit.training.config import TrainConfig
from lungvit.training.learn.fit import fit
from lungvit.training.jobs import worker_hooks
from lungvit.training.jobs.loopback_pg import install as install_loopback_rendezvous
from lungvit.training.jobs.ray_report import (CHECKPOINT_FILE, SCORE_ATTRIBUTE, ReportToRay,
                                              step_of)
from lungvit.training.store import open_store
from lungvit.training.store.resumable import latest_resumable
from lungvit.training.jobs.store_callback import StoreCallback


class RayTrainingError(LungViTError):
    """The Ray Train run failed (a worker error after the allowed retries, or Ray itself)."""


def abort_training() -> None:
    """Ask the running ``TorchTrainer.fit`` (in this process's main thread) to abort.

    Ray Train's driver handles SIGINT by aborting its controller, which kills the workers;
    ``fit`` then raises ``SystemExit`` or ``KeyboardInterrupt`` in the main thread.
    """
    os.kill(os.getpid(), signal.SIGINT)


@dataclass
class TrainSpec:
    """One Ray Train run of a job (everything the workers need, all picklable).

    Args:
        train_config: a resolved :class:`~lungvit.training.config.TrainConfig` as a dict.
        job_id, db_url: the job and its store, written to by rank 0.
        workers: data-parallel workers.
        use_gpu: one GPU per worker (or ``resources_per_worker["GPU"]``).
        resources_per_worker: Ray resources per worker, e.g. {"CPU": 2, "GPU": 1}.
        max_failures: worker-group restarts Ray may do before the run fails.
        keep_best_k: checkpoints Ray keeps, by lowest validation loss.
        storage_path: folder for Ray's run state and checkpoints (local, or shared by all
            nodes of a cluster).
        name: the Ray run name; a run started again under the same name resumes from its
            latest checkpoint.
        launch_id: identifies this start of the job (to tell a Ray restart of the workers
            from the first start).
        metrics_every_n_steps: store the training loss and learning rate every N steps.
        mlflow_uri: also log metrics to this MLflow tracking server.
        resume_from: a Lightning checkpoint to continue from, unless Ray has a newer one.
        worker_hooks: tests only: a module whose ``install`` each worker calls before it
            trains (:mod:`lungvit.training.jobs.worker_hooks`); None in production.
        worker_hooks_args: that module's settings (``spec.worker_hooks_args``).
        owner_pid, owner_host: the job process that runs this (a restart of the workers
            counts as a new attempt only while the job is still that process's).
        in_process: train in this process with Ray Train's local mode (``workers`` must
            be 1; no cluster needs to be connected).
    """

    train_config: dict[str, Any]
    job_id: int
    db_url: str
    owner_pid: int
    owner_host: str
    workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    max_failures: int = 1
    keep_best_k: int = 3
    storage_path: str = ""
    name: str = "lungvit"
    launch_id: str = ""
    metrics_every_n_steps: int = 1
    mlflow_uri: str | None = None
    resume_from: str | None = None
    worker_hooks: str | None = None
    worker_hooks_args: dict[str, Any] | None = None
    in_process: bool = False

    def __post_init__(self) -> None:
        # pid 0 would make os.kill signal the whole process group (a hook that kills the
        # job process, as the tests' fault hooks do).
        if self.owner_pid <= 0 or not self.owner_host:
            raise ValueError(f"TrainSpec needs the job process's pid and host, got "
                             f"{self.owner_pid!r} on {self.owner_host!r}")
        if self.in_process and self.workers != 1:
            raise ValueError(f"an in-process run has one worker, not {self.workers}")
        if self.worker_hooks is not None and not worker_hooks.is_module_name(
                self.worker_hooks):
            raise ValueError(f"worker_hooks must be a dotted module name, not "
                             f"{self.worker_hooks!r}")


class _LoopbackTorchBackend(_TorchBackend):
    """Ray's torch backend, whose process group stays on loopback on a local cluster (see
    :mod:`lungvit.training.jobs.loopback_pg`; on other clusters it is Ray's own)."""

    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        worker_group.execute(install_loopback_rendezvous)
        super().on_start(worker_group, backend_config)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """:class:`ray.train.torch.TorchConfig` with :class:`_LoopbackTorchBackend`."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend


def train(spec: TrainSpec) -> None:
    """Run the training on the connected cluster, or in this process for an in-process
    spec; return when the workers are done.

    Raises:
        RayTrainingError: the run failed (its message holds the workers' error).
        SystemExit, KeyboardInterrupt: the run was aborted (:func:`abort_training`).
    """
    # Ray's fit() installs its SIGINT handler (abort the run) for good, and Lightning ignores
    # SIGINT while it shuts down after one: put ours back after either.
    previous = signal.getsignal(signal.SIGINT)
    try:
        (_fit_in_process if spec.in_process else _fit_on_cluster)(spec)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _fit_on_cluster(spec: TrainSpec) -> None:
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec},
        torch_config=LoopbackTorchConfig(),  # no worker socket beyond 127.0.0.1 locally
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=spec.resources_per_worker),
        run_config=RunConfig(
            name=spec.name, storage_path=spec.storage_path,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, spec.keep_best_k),
                                               checkpoint_score_attribute=SCORE_ATTRIBUTE,
                                               checkpoint_score_order="min"),
            callbacks=[WorkerFailureEvents(spec.db_url, spec.job_id)]))
    try:
        trainer.fit()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # Ray's TrainingFailedError and friends: report their text
        raise RayTrainingError(_describe_failure(exc)) from exc


def _fit_in_process(spec: TrainSpec) -> None:
    """Ray Train's local mode: the training function runs here, in the main thread.

    SIGINT (:func:`abort_training`) interrupts it: Lightning stops gracefully and raises
    ``SystemExit``. A failure is recorded and the training starts again from the latest
    checkpoint, ``spec.max_failures`` times at most.
    """
    trainer = TorchTrainer(_train_worker, train_loop_config={"spec": spec},
                           scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(name=spec.name, storage_path=spec.storage_path))
    for failures in range(spec.max_failures + 1):
        try:
            trainer.fit()
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            record_worker_failures(spec.db_url, spec.job_id, {0: exc})
            if failures == spec.max_failures:
                raise RayTrainingError(_describe_failure(exc)) from exc


def record_worker_failures(db_url: str, job_id: int, errors: dict[int, BaseException]) -> None:
    """One error event per failed worker rank, with the first line of its error."""
    with open_store(db_url) as store:
        for rank, exc in sorted(errors.items()):
            first = (str(exc).strip().splitlines() or [""])[0][:500]
            store.add_event(job_id, f"worker rank {rank} failed: {type(exc).__name__}: {first}",
                            "error")


def _describe_failure(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) < 20000 else text[:20000] + "\n[...]"


def _train_worker(config: dict[str, Any]) -> None:
    """The per-worker training function (runs in each Ray Train worker process)."""
    spec: TrainSpec = config["spec"]
    rank = ray.train.get_context().get_world_rank()
    cfg = TrainConfig.from_dict(dict(spec.train_config))
    where = (f"in the job process (Ray Train local mode, {socket.gethostname()}, "
             f"pid {os.getpid()})" if spec.in_process else
             f"on node {ray.get_runtime_context().get_node_id()} "
             f"({ray.util.get_node_ip_address()}, pid {os.getpid()})")
    with open_store(spec.db_url) as store:  # where each rank runs, for `lungvit runs show`
        store.add_event(spec.job_id, f"worker rank {rank} {where}")
    if spec.in_process:  # as a Ray worker gets OMP_NUM_THREADS from its CPU reservation
        torch.set_num_threads(max(1, int((spec.resources_per_worker or {}).get("CPU", 1))))
    store_cb = StoreCallback(spec.db_url, spec.job_id,
                             every_n_steps=spec.metrics_every_n_steps) if rank == 0 else None
    if store_cb is not None and _is_restart(Path(cfg.run_dir), spec.launch_id):
        store_cb.new_attempt("Ray restarted the workers after a failure",
                             pid=spec.owner_pid, hostname=spec.owner_host)
    # The store callback goes first: a step's metrics are in the store before a checkpoint
    # of that step is reported, so a run resumed from any checkpoint misses none of them.
    callbacks: list[Any] = [] if store_cb is None else [store_cb]
    on_checkpoint = store_cb.record_checkpoint if store_cb else None
    if spec.worker_hooks is not None:  # tests only (fault injection)
        callbacks, on_checkpoint = worker_hooks.apply(
            spec.worker_hooks, rank=rank, spec=spec, callbacks=callbacks,
            on_checkpoint=on_checkpoint)
    callbacks.append(ReportToRay(on_checkpoint, local_dir=Path(spec.storage_path) / spec.name
                                 if spec.in_process else None, keep_best_k=spec.keep_best_k))
    extra = {"logger": _loggers(cfg, spec)} if spec.mlflow_uri else {}

    with _resume_point(spec) as resume_from:
        if resume_from is not None:
            cfg.resume_from = resume_from
            if store_cb is not None:
                store_cb.event(f"continuing from checkpoint {Path(resume_from).parent.name}")
        ray_parts = {} if spec.in_process else {
            "strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()]}
        result = fit(cfg, callbacks=callbacks, progress=False, extra_trainer_kwargs=extra,
                     **ray_parts)
    if store_cb is not None:
        store_cb.record_result(result)


@contextmanager
def _resume_point(spec: TrainSpec) -> Iterator[str | None]:
    """The Lightning checkpoint to continue from, if any: the newest of the one Ray hands
    back (after it restarted the workers, or for a run started again under its name),
    ``spec.resume_from`` (the newest one the store knew when the job was resumed) and the
    newest intact one the store knows now. The last matters when a node dies just after a
    checkpoint was saved and recorded but before Ray's controller registered it: Ray would
    hand back the one before, and the steps between would be trained twice."""
    checkpoint = ray.train.get_checkpoint()
    ray_step = step_of(Path(checkpoint.path).name) if checkpoint is not None else -1
    with open_store(spec.db_url) as store:
        stored = latest_resumable(store, spec.job_id)
    given = max((p for p in (spec.resume_from, stored) if p),
                key=lambda p: step_of(Path(p).parent.name), default=None)
    given_step = step_of(Path(given).parent.name) if given else -1
    if given and given_step > ray_step:
        yield given
    elif checkpoint is not None:
        with checkpoint.as_directory() as folder:
            yield str(Path(folder) / CHECKPOINT_FILE)
    else:
        yield None


def _is_restart(run_dir: Path, launch_id: str) -> bool:
    """True when this job start already ran the workers once (Ray is restarting them)."""
    marker = run_dir / f".workers_started-{launch_id}"
    if marker.exists():
        return True
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return False


def _loggers(cfg: TrainConfig, spec: TrainSpec) -> list[Any]:
    """fit's CSV log plus MLflow (Lightning's loggers write from rank 0 only)."""
    return [CSVLogger(cfg.run_dir, name="logs", version=""),
            MLFlowLogger(experiment_name="lungvit", run_name=f"job-{spec.job_id}",
                         tracking_uri=spec.mlflow_uri)]


class WorkerFailureEvents(UserCallback):
    """Ray Train callback (runs in the controller, on the driver's node): log worker errors."""

    def __init__(self, db_url: str, job_id: int) -> None:
        self.db_url, self.job_id = db_url, job_id

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]
                        ) -> None:
        record_worker_failures(self.db_url, self.job_id, worker_exceptions)
