"""What a fine-tune job is asked to do, and where it keeps its files.

A :class:`JobRequest` is stored with its job (as JSON) when the job API
(:mod:`lungvit.training.jobs.runner`) queues it, and read back by the process that runs it
(:mod:`lungvit.training.jobs.execute`).
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy.engine import make_url

from lungvit.core.configs import unknown_keys
from lungvit.core.errors import LungViTError
from lungvit.training.config import TrainConfig
from lungvit.training.jobs.worker_hooks import is_module_name
from lungvit.training.store import default_data_dir, default_db_url

DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_STALE_AFTER_S = 60.0
LOG_NAME = "job.log"
# The job process's module (it calls run_job); named, not imported: training imports no cli.
JOB_PROCESS = "lungvit.cli.job_process"
MODEL_NAME = "model.safetensors"
# How a job runs its Ray Train training: "cluster", one or more Ray Train workers on a Ray
# cluster; "in-process", Ray Train's local mode (one worker, the job process itself, no
# cluster: starts in seconds); "auto", in-process for one worker when no Ray cluster is
# named (``ray_address`` or ``RAY_ADDRESS``), else cluster.
IN_PROCESS = "in-process"  # also the Ray address recorded for such a job
RUNTIMES = ("cluster", IN_PROCESS, "auto")


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
        runtime: ``"cluster"``, ``"in-process"`` or ``"auto"`` (see ``RUNTIMES``).
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
    runtime: str = "cluster"

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
        if self.runtime not in RUNTIMES:
            problems.append(f"runtime must be one of {', '.join(RUNTIMES)}, not {self.runtime!r}")
        elif self.runtime == IN_PROCESS and (self.workers != 1 or self.ray_address):
            problems.append("runtime in-process runs one worker in the job process: it takes "
                            "workers=1 and no ray_address")
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

    def in_process(self, environ: Mapping[str, str] = os.environ) -> bool:
        """Whether the job trains in its own process (Ray Train's local mode)."""
        if self.runtime == "auto":
            return self.workers == 1 and not (self.ray_address or environ.get("RAY_ADDRESS"))
        return self.runtime == IN_PROCESS

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



def store_url(db_url: str | None) -> str:
    """The store a job call means: ``db_url``, else the user's default store."""
    return db_url or default_db_url()


def request_from_cli(cfg: TrainConfig, opts: argparse.Namespace) -> JobRequest:
    """The job request of ``lungvit train``: its TrainConfig plus the job options of
    :func:`lungvit.cli.runs_cmd.add_job_arguments`."""
    request = JobRequest(train=cfg.to_dict(), workers=opts.workers or 1,
                         use_gpu=bool(opts.gpu), ray_address=opts.ray_address,
                         mlflow_uri=opts.mlflow)
    if getattr(opts, "in_process", None):
        request.runtime = IN_PROCESS
    if opts.max_failures is not None:
        request.max_failures = opts.max_failures
    if opts.cpus_per_worker is not None:
        request.cpus_per_worker = opts.cpus_per_worker
    return request.validate()

