"""Shared helper for the strict ``from_dict`` of LungViT's config dataclasses."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def unknown_keys(cls: type, data: Mapping[str, Any]) -> list[str]:
    """Keys of ``data`` that are not fields of dataclass ``cls``, sorted.

    Config loaders refuse these instead of silently ignoring a misspelt setting.
    """
    known = {f.name for f in fields(cls)}
    return sorted(set(data) - known)
