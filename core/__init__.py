"""LungViT core: scan ingestion, the model, checkpoints, prediction and explanations.

This package never imports gradio, ray, lightning or sqlalchemy (a test checks), so it
can be used from scripts, notebooks and benchmarks with only torch, timm and pydicom.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lungvit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
