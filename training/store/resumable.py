"""Which recorded checkpoint a job continues from when it resumes or its workers restart.

Kept beside the store rather than with the job process or the Ray workers: both ask it
(:mod:`lungvit.training.jobs.runner` when a job starts again,
:mod:`lungvit.training.jobs.ray_train` when Ray restarts the workers).
"""
from __future__ import annotations

from pathlib import Path

from lungvit.training.data.discover import file_sha256

from .repo import Store


def latest_resumable(store: Store, job_id: int) -> str | None:
    """The newest intact resumable checkpoint the store knows of (a resumed job's start).

    Args:
        store: the tracking store.
        job_id: the job.

    Returns:
        The path of the highest-version Lightning checkpoint (``.ckpt``) of the job whose
        file still exists with the SHA-256 the store recorded; None if there is none.
    """
    for c in sorted(store.checkpoints(job_id), key=lambda c: c.version, reverse=True):
        if c.path.endswith(".ckpt") and Path(c.path).is_file() and \
                file_sha256(c.path) == c.sha256:
            return c.path
    return None
