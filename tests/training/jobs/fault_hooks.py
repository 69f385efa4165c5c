"""Fault injection for the job tests, installed in the Ray workers through the worker-hooks
seam (:mod:`lungvit.training.jobs.worker_hooks`).

A job request opts in with ``"worker_hooks": "fault_hooks"`` and, in ``worker_hooks_args``:

- ``{"rank": r, "step": s}``: worker ``r`` exits hard at optimizer step ``s``, once;
- ``{"kill_job_at_checkpoint": s}``: once checkpoint ``s`` is in the store, rank 0 SIGKILLs
  the job process (``spec.owner_pid``), then itself, once;
- ``{"raise_at_step": s}``: the training raises ``RuntimeError`` at optimizer step ``s``,
  once (an error in the training code rather than a dead process).

"Once" is kept by a marker file in the run folder, so a restart or a resume runs clean.
The job process and its Ray workers import this file as the top-level module
``fault_hooks``: the tests put its folder (:data:`FOLDER`) on their ``PYTHONPATH``
(:func:`environment`). Nothing here may import the test package.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray
from lightning.pytorch.callbacks import Callback

MODULE = "fault_hooks"
FOLDER = Path(__file__).resolve().parent
MARKER = ".fault_injected"
OnCheckpoint = Callable[[int, str, "float | None"], None]


def environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``PYTHONPATH`` with this folder first, for the job process (its Ray workers inherit
    it)."""
    path = [str(FOLDER), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(path)}


def install(*, rank: int, spec: Any, callbacks: list[Any], on_checkpoint: OnCheckpoint | None
            ) -> tuple[list[Any], OnCheckpoint | None]:
    """The worker-hooks entry point: add the faults ``spec.worker_hooks_args`` asks for."""
    fault = dict(spec.worker_hooks_args or {})
    marker = Path(spec.train_config["run_dir"]) / MARKER
    kill_at = fault.pop("kill_job_at_checkpoint", None)
    if on_checkpoint is not None and kill_at is not None:
        on_checkpoint = kill_job_after(on_checkpoint, kill_at, spec.owner_pid, marker)
    raise_at = fault.pop("raise_at_step", None)
    if raise_at is not None:
        callbacks = [*callbacks, RaiseOnce(raise_at, marker)]
    if fault:
        callbacks = [*callbacks, FailOnce(rank, **fault, marker=marker)]
    return callbacks, on_checkpoint


class FailOnce(Callback):
    """Worker ``rank`` exits hard at optimizer step ``step``, the first time only.

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


class RaiseOnce(Callback):
    """The training raises ``RuntimeError`` at optimizer step ``step``, the first time only."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step >= self.step and not self.marker.exists():
            self.marker.write_text(f"raised at step {trainer.global_step}\n")
            raise RuntimeError(f"fault injection: raised at step {trainer.global_step}")


def kill_job_after(record: OnCheckpoint, step: int, pid: int, marker: Path) -> OnCheckpoint:
    """``record``, then, once checkpoint ``step`` is recorded, SIGKILL of the job process
    and of this worker (rank 0), so that nothing more reaches the store: whatever of that
    step it still lacked would be lost to a resume from that checkpoint. The other workers
    are left to die with the job (Ray ties them to it)."""
    def record_then_kill(at: int, path: str, val_loss: float | None) -> None:
        record(at, path, val_loss)
        if at == step and not marker.exists():
            marker.write_text(f"job process {pid} and rank 0 killed after checkpoint {at}\n")
            sys.stderr.write(f"fault injection: killing the job process {pid} and rank 0\n")
            sys.stderr.flush()
            os.kill(pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
    return record_then_kill
