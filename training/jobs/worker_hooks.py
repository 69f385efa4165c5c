"""The worker-hooks seam: a module that may add to what each Ray Train worker runs.

A job request may name ``worker_hooks``, a module, and ``worker_hooks_args``, its
settings (plain JSON, kept with the request). Each Ray Train worker of the job then
imports the module and, before it trains, calls its ``install``::

    def install(*, rank: int, spec: TrainSpec, callbacks: list[Callback],
                on_checkpoint: OnCheckpoint | None) -> tuple[list[Callback], OnCheckpoint | None]

with its world ``rank``, the run's :class:`~lungvit.training.jobs.ray_train.TrainSpec`
(``spec.worker_hooks_args`` holds the settings), the Lightning callbacks so far (the
worker appends its checkpoint reporter after those returned) and, on rank 0, the function
called with ``(step, checkpoint path, validation loss)`` once a checkpoint is reported
(None on the other ranks). What it returns is used instead.

The app and ``lungvit`` never set it; the job tests do, to make workers fail on cue
(``tests/training/jobs/fault_hooks.py``). The module must be importable in the job process
(which checks it before it starts Ray) and in every worker: on a local cluster the workers
inherit the job process's environment, so ``PYTHONPATH`` is enough.
"""
from __future__ import annotations

import importlib
import importlib.util
import keyword
from collections.abc import Callable
from typing import Any

OnCheckpoint = Callable[[int, str, "float | None"], None]


def is_module_name(name: object) -> bool:
    """Whether ``name`` is a plain dotted module name (``pkg.module``): no path, no
    relative import, no keyword."""
    return isinstance(name, str) and all(
        part.isidentifier() and not keyword.iskeyword(part) for part in name.split("."))


def check_importable(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a module name this process can import."""
    if not is_module_name(name):
        raise ValueError(f"worker_hooks must be a dotted module name such as pkg.module, "
                         f"not {name!r}")
    try:
        found = importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        found = False
    if not found:
        raise ValueError(f"worker_hooks module {name} cannot be imported (is it on "
                         "PYTHONPATH?)")


def apply(name: str, *, rank: int, spec: Any, callbacks: list[Any],
            on_checkpoint: OnCheckpoint | None) -> tuple[list[Any], OnCheckpoint | None]:
    """Import hooks module ``name`` and let its ``install`` change the worker's callbacks.

    Returns:
        (callbacks, on_checkpoint) as the module's ``install`` returns them.
    """
    if not is_module_name(name):
        raise ValueError(f"worker_hooks must be a dotted module name, not {name!r}")
    module = importlib.import_module(name)
    return module.install(rank=rank, spec=spec, callbacks=list(callbacks),
                          on_checkpoint=on_checkpoint)
