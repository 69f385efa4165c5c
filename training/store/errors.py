"""Exceptions raised by the tracking store."""
from __future__ import annotations

from lungvit.core.errors import LungViTError


class StoreError(LungViTError):
    """The tracking store could not do what was asked."""


class SchemaVersionError(StoreError):
    """The database was written by a newer LungViT, or is not a LungViT store at all."""


class JobNotFoundError(StoreError, KeyError):
    """No job (or no checkpoint of that job) has the given id or version."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidTransitionError(StoreError, ValueError):
    """A job status change that the job life cycle does not allow."""


class AttemptConflictError(InvalidTransitionError):
    """Another process already claimed the job's attempt (or the job is no longer the
    caller's to run): the caller must stop, leaving the job as it is."""
