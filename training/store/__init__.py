"""Tracking store of LungViT fine-tune jobs: jobs, metrics, checkpoints and events.

The single source of truth the training job writes and the app reads. By default a SQLite
file in the user's data directory (``$LUNGVIT_HOME``, else ``$XDG_DATA_HOME/lungvit``, else
``~/.local/share/lungvit``), or a PostgreSQL database
(``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB``, ``pip install 'lungvit[postgres]'``);
no other backend is accepted. Several processes may write at once.

    store = open_store()                      # or open_store("postgresql+psycopg://...")
    job = store.create_job({"data_dir": "...", "epochs": 12})
    attempt = store.start_attempt(job, resolved_config=cfg, hardware=hw)
    store.record_metrics(job, step, {"train/loss": 0.41}, epoch=0)
"""
from __future__ import annotations

from .engine import LATEST_VERSION, migrate
from .errors import (AttemptConflictError, InvalidTransitionError, JobNotFoundError,
                     SchemaVersionError, StoreError)
from .paths import default_data_dir, default_db_path, default_db_url
from .records import CheckpointRecord, EventRecord, JobRecord
from .repo import Store, open_store
from .schema import TERMINAL, TRANSITIONS, JobStatus

__all__ = [
    "LATEST_VERSION",
    "TERMINAL",
    "TRANSITIONS",
    "AttemptConflictError",
    "CheckpointRecord",
    "EventRecord",
    "InvalidTransitionError",
    "JobNotFoundError",
    "JobRecord",
    "JobStatus",
    "SchemaVersionError",
    "Store",
    "StoreError",
    "default_data_dir",
    "default_db_path",
    "default_db_url",
    "migrate",
    "open_store",
]
