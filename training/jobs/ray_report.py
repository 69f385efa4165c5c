"""Reporting a job's checkpoints to Ray Train from the Lightning training.

:class:`ReportToRay` is the Lightning callback every Ray Train worker runs: after each
validation it reports the loss and a resumable checkpoint (rank 0's) to Ray, which keeps
the best ``keep_best_k``; in Ray Train's local mode (a one-worker job in the job process)
Ray keeps none, so the callback writes and prunes them itself in the same folders.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from lightning.pytorch.callbacks import Callback
from ray.train import Checkpoint
from ray.train.lightning import prepare_trainer

CHECKPOINT_FILE = "checkpoint.ckpt"  # the Lightning checkpoint inside a Ray checkpoint folder
CHECKPOINT_PREFIX = "checkpoint_step"  # + the optimizer step: the folder Ray copies it to
SCORE_ATTRIBUTE = "val_loss"
LOCAL_SCORE_FILE = "score.json"  # in-process runs: a checkpoint's validation loss, for pruning


def checkpoint_dir_name(step: int) -> str:
    """The folder of the checkpoint reported at optimizer step ``step``."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def step_of(dir_name: str) -> int:
    try:
        return int(dir_name.removeprefix(CHECKPOINT_PREFIX))
    except ValueError:
        return -1


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
        local_dir: Ray Train's local mode (which keeps no checkpoints): write each
            checkpoint to ``<local_dir>/checkpoint_step<N>/`` here, keeping the newest and
            the ``keep_best_k`` best by validation loss, and report only the metrics to Ray.
        keep_best_k: see ``local_dir``.
    """

    def __init__(self, on_checkpoint: Callable[[int, str, float | None], None] | None,
                 local_dir: Path | None = None, keep_best_k: int = 3) -> None:
        self.on_checkpoint = on_checkpoint
        self.local_dir, self.keep_best_k = local_dir, max(1, keep_best_k)
        self._pending_step: int | None = None  # an epoch-end validation not reported yet

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.local_dir is None:
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
        if self.local_dir is not None:
            path = self._keep_locally(trainer, name, val_loss)
            ray.train.report(metrics)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="lungvit-ray-ckpt-"))
            try:
                trainer.save_checkpoint(tmp / CHECKPOINT_FILE)  # a collective; rank 0 writes
                checkpoint = (Checkpoint.from_directory(str(tmp)) if trainer.is_global_zero
                              else None)
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            storage = ray.train.get_context().get_storage()
            path = Path(storage.build_checkpoint_path_from_name(name)) / CHECKPOINT_FILE
        if trainer.is_global_zero and self.on_checkpoint is not None:
            self.on_checkpoint(step, str(path), val_loss)

    def _keep_locally(self, trainer: Any, name: str, val_loss: float) -> Path:
        """Write the checkpoint to ``local_dir/name`` (whole or not at all); prune."""
        assert self.local_dir is not None
        self.local_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.local_dir))
        try:
            trainer.save_checkpoint(tmp / CHECKPOINT_FILE)
            (tmp / LOCAL_SCORE_FILE).write_text(json.dumps({SCORE_ATTRIBUTE: val_loss}))
            final = self.local_dir / name
            if final.exists():  # the same step reported again after a restart
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune(keep=final)
        return final / CHECKPOINT_FILE

    def _prune(self, keep: Path) -> None:
        """Delete checkpoints other than ``keep`` (the newest) and the best k by loss."""
        scored = []
        for folder in self.local_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            try:
                loss = float(json.loads((folder / LOCAL_SCORE_FILE).read_text())[SCORE_ATTRIBUTE])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not one of ours: leave it alone
            scored.append((math.inf if math.isnan(loss) else loss, folder))
        best = {folder for _, folder in sorted(scored, key=lambda x: x[0])[:self.keep_best_k]}
        for _, folder in scored:
            if folder != keep and folder not in best:
                shutil.rmtree(folder, ignore_errors=True)
