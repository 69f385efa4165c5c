"""A Lightning callback that writes a job's progress into the tracking store.

It runs in the training processes (a Ray Train worker, or any Lightning run) and acts on
global rank 0 only: the others compute the same synchronised values. Rows are keyed by the
optimizer step (``trainer.global_step``), so a step that is trained again after a restart
overwrites its rows instead of adding new ones. Only numbers, names and paths are written.
"""
from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lungvit.training.learn.compare import comparison_scalars, describe_comparison
from lungvit.training.data.discover import file_sha256
from lungvit.training.learn.fit import FitResult
from lungvit.training.learn.metrics import scalar_metrics
from lungvit.training.store import Store, open_store
from lungvit.training.learn.transfer import describe_run

MONITOR = "val/loss"  # what "best" means: the lowest validation loss
STEP_SUFFIX = "_step"


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-element tensors and numbers of Lightning's ``callback_metrics``."""
    out = {}
    for name, value in metrics.items():
        if hasattr(value, "numel"):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def step_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Per-step values: ``x_step`` logged as ``x``, plus the learning rate."""
    values = _scalars(metrics)
    out = {k[:-len(STEP_SUFFIX)]: v for k, v in values.items() if k.endswith(STEP_SUFFIX)}
    if "lr" in values:
        out["lr"] = values["lr"]
    return out


def eval_metrics(metrics: Mapping[str, Any], prefix: str = "val/") -> dict[str, float]:
    """The values of one evaluation (``val/loss``, ``val/acc``, ...)."""
    return {k: v for k, v in _scalars(metrics).items() if k.startswith(prefix)}


def epoch_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Training averages over the epoch just finished, named ``train/<x>_epoch``."""
    out = {}
    for k, v in _scalars(metrics).items():
        if not k.startswith("train/") or k.endswith(STEP_SUFFIX):
            continue
        if k.endswith("_epoch"):
            out[k] = v
        elif f"{k}{STEP_SUFFIX}" not in metrics:  # logged per epoch only (train/acc)
            out[f"{k}_epoch"] = v
    return out


class StoreCallback(Callback):
    """Write metrics, checkpoints and the final model of job ``job_id`` into the store.

    Args:
        db_url: the store's SQLAlchemy URL.
        job_id: the job being trained.
        every_n_steps: store the per-step values (training loss, learning rate) every N
            optimizer steps; evaluations and epoch averages are always stored.
    """

    def __init__(self, db_url: str, job_id: int, *, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.db_url, self.job_id, self.every_n_steps = db_url, job_id, every_n_steps
        self._store: Store | None = None
        self._last_step = -1
        self._best: float | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.db_url)
        return self._store

    # ---------------------------------------------------------------------- job life
    def event(self, message: str, level: str = "info") -> None:
        self.store.add_event(self.job_id, message, level)

    def new_attempt(self, reason: str, *, pid: int, hostname: str) -> int:
        """Count a restart of the workers as a new attempt of the job (attempt + 1).

        The job stays running, in its process, run folder and configuration; the store
        bumps the attempt atomically (:meth:`Store.restart_attempt`).

        Args:
            reason: why the workers restarted (a warning event).
            pid, hostname: the job process the workers belong to.

        Returns:
            The new attempt number.

        Raises:
            AttemptConflictError: the job is no longer running in that process (it was
                cancelled, or declared interrupted and perhaps resumed elsewhere).
        """
        return self.store.restart_attempt(self.job_id, pid=pid, hostname=hostname,
                                          reason=reason)

    # ---------------------------------------------------------------------- Lightning
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            done = [c.metric_value for c in self.store.checkpoints(self.job_id)
                    if c.metric_name == MONITOR and c.metric_value is not None
                    and not math.isnan(c.metric_value)]
            self._best = min(done) if done else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if not trainer.is_global_zero or step == self._last_step:
            return  # not rank 0, or an accumulation batch (no optimizer step)
        self._last_step = step
        if step % self.every_n_steps == 0:
            values = step_metrics(trainer.callback_metrics)
            self.store.record_metrics(self.job_id, step, values, epoch=trainer.current_epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.store.record_metrics(self.job_id, int(trainer.global_step),
                                      eval_metrics(trainer.callback_metrics),
                                      epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.store.record_metrics(self.job_id, int(trainer.global_step),
                                      epoch_metrics(trainer.callback_metrics),
                                      epoch=trainer.current_epoch)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._store is not None:
            self._store.close()

    # ---------------------------------------------------------------------- checkpoints
    def record_checkpoint(self, step: int, path: str, val_loss: float | None) -> None:
        """Register the resumable checkpoint saved at ``step`` (its version is the step)."""
        value = None if val_loss is None or math.isnan(val_loss) else float(val_loss)
        best = value is not None and (self._best is None or value < self._best)
        if best:
            self._best = value
        self.store.record_checkpoint(self.job_id, version=step, path=path,
                                     sha256=file_sha256(path), metric_name=MONITOR,
                                     metric_value=value, is_best=best)

    def record_result(self, result: FitResult) -> None:
        """Register the final core checkpoint (the deliverable) and the final metrics.

        Its version follows every resumable checkpoint's; it becomes the job's best, since
        it holds the weights of the lowest validation loss, calibrated.
        """
        if result.checkpoint is None:
            return
        path = str(Path(result.checkpoint).resolve())
        done = self.store.checkpoints(self.job_id)
        # A model written before (then the job was interrupted and resumed) is replaced.
        same = [c.version for c in done if c.path == path]
        version = same[0] if same else max([result.steps, *(c.version for c in done)]) + 1
        val_loss = result.metrics.get("loss")
        self.store.record_checkpoint(self.job_id, version=version, path=path,
                                     sha256=file_sha256(path), metric_name=MONITOR,
                                     metric_value=val_loss, is_best=True)
        self.store.set_result(self.job_id, path, final_metrics(result))
        self.event(f"final model written: {Path(path).name} (v{version}, "
                   f"{os.path.getsize(path) / 1e6:.1f} MB on {socket.gethostname()})")
        for line in describe_run(result.transfer, None).splitlines():
            self.event(line)
        comparison = describe_comparison(result.comparison)
        if comparison:
            self.event(" ".join(comparison.split()),
                       "warning" if result.comparison.get("error") else "info")


def final_metrics(result: FitResult) -> dict[str, float]:
    """The scalars the store keeps as a job's final metrics (``compare`` shows them).

    Besides the test and validation metrics: the base-vs-tuned comparison on the test
    split as ``compare/base_acc``, ``compare/tuned_acc``, ``compare/delta_acc`` (and the
    same for ``macro_recall``), ``compare/n_test``, ``compare/n_test_total`` and
    ``compare/better`` (1 or 0), when the run had a base model to compare with.
    """
    out: dict[str, float] = {}
    for prefix, report in (("test/", result.test_metrics), ("val/", result.metrics)):
        out.update({prefix + k: v for k, v in scalar_metrics(report).items()})
    out.update(temperature=float(result.temperature), steps=float(result.steps),
               epochs=float(result.epochs), train_time_s=float(result.wall_time_s))
    out.update(comparison_scalars(result.comparison))
    return out
