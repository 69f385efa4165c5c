"""Ray: the one module of LungViT that imports it.

Two things live here. :func:`connect` gives the job process a Ray cluster: by default a
local one it starts itself, listening on 127.0.0.1 only, without a dashboard, with token
authentication on (a fresh random token, handed to Ray's processes through the
environment); or an existing cluster (``--ray-address`` / ``RAY_ADDRESS``), whose security
is its operator's. :func:`train` runs the Lightning training of :mod:`lungvit.training.learn.fit`
as a Ray Train ``TorchTrainer``: every worker calls ``fit`` with Ray's DDP strategy and
environment plugin, reports a resumable checkpoint to Ray after each validation (Ray keeps
the best ``keep_best_k`` by validation loss), and rank 0 writes metrics and checkpoints to
the tracking store.

A local cluster is kept on 127.0.0.1 the way Ray keeps one on a laptop (Ray's
``ENABLE_RAY_CLUSTER`` switch, also passed to its processes as
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and :func:`connect` checks the addresses it
came up on before using it.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from ray._private import ray_constants
from ray._raylet import AuthenticationMode, Config, get_authentication_mode
from ray.train import (Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig,
                       UserCallback)
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend

from lungvit.core.errors import LungViTError
from lungvit.core.netaddr import host_of as _host_of
from lungvit.core.netaddr import is_loopback
from lungvit.training.config import TrainConfig
from lungvit.training.learn.fit import fit
from lungvit.training.jobs.loopback_pg import install as install_loopback_rendezvous
from lungvit.training.jobs.ray_address import check_address
from lungvit.training.store import open_store
from lungvit.training.jobs.store_callback import StoreCallback

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.ckpt"  # the Lightning checkpoint inside a Ray checkpoint folder
CHECKPOINT_PREFIX = "checkpoint_step"  # + the optimizer step: the folder Ray copies it to
SCORE_ATTRIBUTE = "val_loss"
FAULT_MARKER = ".fault_injected"


class RaySecurityError(LungViTError):
    """LungViT refuses to start Ray this way (authentication off, an exposed dashboard, ...)."""


class RayTrainingError(LungViTError):
    """The Ray Train run failed (a worker error after the allowed retries, or Ray itself)."""


@dataclass(frozen=True)
class ClusterOptions:
    """Which Ray cluster a job uses.

    Args:
        address: an existing cluster (``host:port`` or ``ray://...``); None: ``RAY_ADDRESS``
            if set, else a local cluster started by the job.
        num_cpus, num_gpus: resources of the local cluster (None: what the machine has).
        dashboard: start the local cluster's dashboard.
        dashboard_host: where the dashboard listens; must be a loopback address.
        log_to_driver: print the workers' output in this process (else it stays in Ray's
            session logs).
    """

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    log_to_driver: bool = True

    def resolved_address(self, environ: Mapping[str, str] = os.environ) -> str | None:
        return self.address or environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class Cluster:
    """The cluster a job is connected to."""

    address: str
    local: bool
    resources: dict[str, float] = field(default_factory=dict)


def check_local_settings(opts: ClusterOptions, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse to start a local Ray with authentication off or a dashboard off loopback.

    Raises:
        RaySecurityError: saying which setting and what to do instead.
    """
    mode = environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        raise RaySecurityError(
            f"refusing to start Ray with RAY_AUTH_MODE={mode}: anyone who can reach its ports "
            "could run code as you. Unset RAY_AUTH_MODE (LungViT then uses token "
            "authentication) or set RAY_AUTH_MODE=token.")
    if opts.dashboard and not is_loopback(opts.dashboard_host):
        raise RaySecurityError(
            f"refusing to start the Ray dashboard on {opts.dashboard_host}: it would be "
            "reachable from other machines. Use 127.0.0.1 (and an SSH tunnel to reach it).")
    flag = environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "").strip().lower()
    if flag in ("1", "true", "yes"):
        raise RaySecurityError(
            "refusing to start Ray with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER set: it makes Ray "
            "listen on every network interface. Unset it, or start a cluster yourself and "
            "pass --ray-address.")


@contextmanager
def connect(opts: ClusterOptions) -> Iterator[Cluster]:
    """Connect this process to Ray for the duration of the block, then disconnect.

    A local cluster started here is shut down on exit (with every worker it ran).

    Raises:
        RaySecurityError: a local cluster would be unsafe, or did not come up loopback-only
            with token authentication.
        RayAddressError: the given cluster does not answer or refuses this process's token.
    """
    address = opts.resolved_address()
    local = address is None
    if local:
        check_local_settings(opts)
        os.environ["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        # Ray's single-machine mode: this node's address is 127.0.0.1 (its processes read
        # the variable, this one the constant, which Ray read when it was imported).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        # Ray caches its configuration; re-read it so this process talks in token mode too
        # (what ray.init does itself when it turns token authentication on).
        Config.initialize("")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ctx = ray.init(address="local", num_cpus=opts.num_cpus, num_gpus=opts.num_gpus,
                       include_dashboard=opts.dashboard, dashboard_host=opts.dashboard_host,
                       _node_ip_address="127.0.0.1", log_to_driver=opts.log_to_driver,
                       configure_logging=False)
    else:
        check_address(address)
        ctx = ray.init(address=address, log_to_driver=opts.log_to_driver,
                       configure_logging=False)
    try:
        gcs = ctx.address_info.get("gcs_address") or address or ""
        if local:
            _verify_local(ctx.address_info)
        resources = {k: float(v) for k, v in ray.cluster_resources().items()
                     if k in ("CPU", "GPU", "memory", "object_store_memory")}
        yield Cluster(address=gcs, local=local, resources=resources)
    finally:
        # Listed before the shutdown: once the raylet is gone its workers have a new parent.
        started = ray_descendants() if local else []
        ray.shutdown()
        _reap(started)


def _verify_local(info: Mapping[str, Any]) -> None:
    """Check that the cluster just started is loopback-only and token-protected."""
    for key in ("node_ip_address", "gcs_address"):
        value = str(info.get(key) or "")
        if not is_loopback(_host_of(value)):
            raise RaySecurityError(f"the local Ray cluster came up on {value} ({key}), not "
                                   "on 127.0.0.1; LungViT stopped it")
    if info.get("webui_url") and not is_loopback(_host_of(str(info["webui_url"]))):
        raise RaySecurityError(f"the Ray dashboard came up on {info['webui_url']}; stopped")
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        raise RaySecurityError("the local Ray cluster came up without token authentication; "
                               "LungViT stopped it")


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process (from /proc; empty where there is none)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            ppid = int(entry.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.parent.name))
    return tree


def ray_descendants(pid: int | None = None) -> list[int]:
    """Ray's processes (raylet, GCS, workers, ...) below process ``pid`` (default: this one).

    Linux only (/proc); elsewhere an empty list.
    """
    tree, out, todo = _children(), [], [os.getpid() if pid is None else pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            todo.append(child)
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ray" in cmd:  # ray::<actor>, .../ray/core/src/ray/raylet/raylet, ...
                out.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _reap(pids: list[int], timeout_s: float = 3.0) -> None:
    """Wait a moment for a stopped local cluster's processes to exit, then kill what is
    left, so a stopped job leaves no worker behind."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        log.warning("killed %d Ray process(es) that outlived ray.shutdown()", len(left))


def abort_training() -> None:
    """Ask the running ``TorchTrainer.fit`` (in this process's main thread) to abort.

    Ray Train's driver handles SIGINT by aborting its controller, which kills the workers;
    ``fit`` then raises ``SystemExit`` or ``KeyboardInterrupt`` in the main thread.
    """
    os.kill(os.getpid(), signal.SIGINT)


# ------------------------------------------------------------------------------ training
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
        fault: test hooks: {"rank": r, "step": s}: worker r exits hard at step s, once;
            {"kill_job_at_checkpoint": s}: once checkpoint s is in the store, rank 0
            SIGKILLs the job process (``owner_pid``), then itself, once.
        owner_pid, owner_host: the job process that runs this (a restart of the workers
            counts as a new attempt only while the job is still that process's).
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
    fault: dict[str, int] | None = None

    def __post_init__(self) -> None:
        # pid 0 would make os.kill signal the whole process group (the fault hook).
        if self.owner_pid <= 0 or not self.owner_host:
            raise ValueError(f"TrainSpec needs the job process's pid and host, got "
                             f"{self.owner_pid!r} on {self.owner_host!r}")


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
    """Run the training on the connected cluster; return when the workers are done.

    Raises:
        RayTrainingError: the run failed (its message holds the workers' error).
        SystemExit, KeyboardInterrupt: the run was aborted (:func:`abort_training`).
    """
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
    # fit() installs Ray's SIGINT handler (abort the run) for good; put ours back after.
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # Ray's TrainingFailedError and friends: report their text
        raise RayTrainingError(_describe_failure(exc)) from exc
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _describe_failure(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) < 20000 else text[:20000] + "\n[...]"


def _train_worker(config: dict[str, Any]) -> None:
    """The per-worker training function (runs in each Ray Train worker process)."""
    spec: TrainSpec = config["spec"]
    rank = ray.train.get_context().get_world_rank()
    cfg = TrainConfig.from_dict(dict(spec.train_config))
    with open_store(spec.db_url) as store:  # where each rank runs, for `lungvit runs show`
        store.add_event(spec.job_id, f"worker rank {rank} on node "
                                     f"{ray.get_runtime_context().get_node_id()} "
                                     f"({ray.util.get_node_ip_address()}, pid {os.getpid()})")
    store_cb = StoreCallback(spec.db_url, spec.job_id,
                             every_n_steps=spec.metrics_every_n_steps) if rank == 0 else None
    if store_cb is not None and _is_restart(Path(cfg.run_dir), spec.launch_id):
        store_cb.new_attempt("Ray restarted the workers after a failure",
                             pid=spec.owner_pid, hostname=spec.owner_host)
    # The store callback goes first: a step's metrics are in the store before a checkpoint
    # of that step is reported, so a run resumed from any checkpoint misses none of them.
    callbacks: list[Any] = [] if store_cb is None else [store_cb]
    on_checkpoint = store_cb.record_checkpoint if store_cb else None
    fault, marker = dict(spec.fault or {}), Path(cfg.run_dir) / FAULT_MARKER
    kill_at = fault.pop("kill_job_at_checkpoint", None)
    if on_checkpoint is not None and kill_at is not None:
        on_checkpoint = _kill_job_after(on_checkpoint, kill_at, spec.owner_pid, marker)
    callbacks.append(ReportToRay(on_checkpoint))
    if fault:
        callbacks.append(FailOnce(rank, **fault, marker=marker))
    extra = {"logger": _loggers(cfg, spec)} if spec.mlflow_uri else {}

    with _resume_point(spec) as resume_from:
        if resume_from is not None:
            cfg.resume_from = resume_from
            if store_cb is not None:
                store_cb.event(f"continuing from checkpoint {Path(resume_from).parent.name}")
        result = fit(cfg, callbacks=callbacks, progress=False, strategy=RayDDPStrategy(),
                     plugins=[RayLightningEnvironment()], extra_trainer_kwargs=extra)
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
    from lungvit.training.jobs.runner import latest_resumable

    checkpoint = ray.train.get_checkpoint()
    ray_step = _step_of(Path(checkpoint.path).name) if checkpoint is not None else -1
    with open_store(spec.db_url) as store:
        stored = latest_resumable(store, spec.job_id)
    given = max((p for p in (spec.resume_from, stored) if p),
                key=lambda p: _step_of(Path(p).parent.name), default=None)
    given_step = _step_of(Path(given).parent.name) if given else -1
    if given and given_step > ray_step:
        yield given
    elif checkpoint is not None:
        with checkpoint.as_directory() as folder:
            yield str(Path(folder) / CHECKPOINT_FILE)
    else:
        yield None


def checkpoint_dir_name(step: int) -> str:
    """The folder of the checkpoint reported at optimizer step ``step``."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _step_of(dir_name: str) -> int:
    try:
        return int(dir_name.removeprefix(CHECKPOINT_PREFIX))
    except ValueError:
        return -1


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


class ReportToRay(Callback):
    """Report each validation's loss and a resumable checkpoint to Ray Train.

    Every rank calls ``ray.train.report`` (it is a barrier); rank 0 hands over the
    checkpoint, which Ray copies to ``<storage>/<run>/checkpoint_step<N>/``. A validation
    at the end of an epoch is reported at the epoch's end, once the epoch's metrics are
    logged (and stored by callbacks placed before this one): Lightning resumes from such a
    checkpoint at the next epoch without running the epoch-end hooks again, so metrics
    written after the checkpoint would be lost for good.

    Args:
        on_checkpoint: called on rank 0 with (step, persisted checkpoint path, val loss).
    """

    def __init__(self, on_checkpoint: Callable[[int, str, float | None], None] | None) -> None:
        self.on_checkpoint = on_checkpoint
        self._pending_step: int | None = None  # an epoch-end validation not reported yet

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        prepare_trainer(trainer)  # checks the strategy and environment are Ray's

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._pending_step = int(trainer.global_step)  # the same on every rank
        else:
            self._report(trainer)  # mid-epoch (val_every_n_steps): nothing else to wait for

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        pending, self._pending_step = self._pending_step, None
        if pending is not None and pending == int(trainer.global_step):
            self._report(trainer)

    def _report(self, trainer: Any) -> None:
        step = int(trainer.global_step)
        loss = trainer.callback_metrics.get("val/loss")
        val_loss = float(loss) if loss is not None else float("nan")
        metrics = {SCORE_ATTRIBUTE: val_loss, "step": step, "epoch": int(trainer.current_epoch)}
        name = checkpoint_dir_name(step)
        tmp = Path(tempfile.mkdtemp(prefix="lungvit-ray-ckpt-"))
        try:
            trainer.save_checkpoint(tmp / CHECKPOINT_FILE)  # a collective; rank 0 writes
            checkpoint = Checkpoint.from_directory(str(tmp)) if trainer.is_global_zero else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if trainer.is_global_zero and self.on_checkpoint is not None:
            storage = ray.train.get_context().get_storage()
            path = Path(storage.build_checkpoint_path_from_name(name)) / CHECKPOINT_FILE
            self.on_checkpoint(step, str(path), val_loss)


class FailOnce(Callback):
    """Test hook: worker ``rank`` exits hard at optimizer step ``step``, the first time only.

    It first waits (up to ``wait_s``) until Ray has registered a checkpoint, so that the
    restart has one to continue from: a checkpoint reported just before a crash may not be
    registered yet, and the restart would then start over (correct, but not what a test of
    resuming wants).
    """

    def __init__(self, this_rank: int, *, rank: int, step: int, marker: Path,
                 wait_s: float = 120.0) -> None:
        self.active = this_rank == rank
        self.step, self.marker, self.wait_s = step, marker, wait_s

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if not self.active or trainer.global_step < self.step or self.marker.exists():
            return
        snapshot = Path(ray.train.get_context().get_storage().checkpoint_manager_snapshot_path)
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline and '"latest_checkpoint_result":{' not in (
                snapshot.read_text() if snapshot.exists() else ""):
            time.sleep(0.2)
        self.marker.write_text(f"worker exited at step {trainer.global_step}\n")
        sys.stderr.write(f"fault injection: exiting at step {trainer.global_step}\n")
        sys.stderr.flush()
        os._exit(1)


def _kill_job_after(record: Callable[[int, str, float | None], None], step: int, pid: int,
                    marker: Path) -> Callable[[int, str, float | None], None]:
    """Test hook: ``record``, then, once checkpoint ``step`` is recorded, SIGKILL of the job
    process and of this worker (rank 0), so that nothing more reaches the store: whatever
    of that step it still lacked would be lost to a resume from that checkpoint. The other
    workers are left to die with the job (Ray ties them to it)."""
    def record_then_kill(at: int, path: str, val_loss: float | None) -> None:
        record(at, path, val_loss)
        if at == step and not marker.exists():
            marker.write_text(f"job process {pid} and rank 0 killed after checkpoint {at}\n")
            sys.stderr.write(f"fault injection: killing the job process {pid} and rank 0\n")
            sys.stderr.flush()
            os.kill(pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
    return record_then_kill


class WorkerFailureEvents(UserCallback):
    """Ray Train callback (runs in the controller, on the driver's node): log worker errors."""

    def __init__(self, db_url: str, job_id: int) -> None:
        self.db_url, self.job_id = db_url, job_id

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]
                        ) -> None:
        with open_store(self.db_url) as store:
            for rank, exc in sorted(worker_exceptions.items()):
                first = (str(exc).strip().splitlines() or [""])[0][:500]
                store.add_event(self.job_id, f"worker rank {rank} failed: "
                                             f"{type(exc).__name__}: {first}", "error")
