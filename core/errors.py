"""Exceptions raised at LungViT's boundaries.

Every message is written for the person who handed us the file: it says what is wrong
and, where there is one, what to do about it. The CLI prints the message alone and the
app turns it into a ``gr.Error``; neither shows a traceback.
"""
from __future__ import annotations


class LungViTError(Exception):
    """Base class of every error LungViT reports to a user."""


class ScanReadError(LungViTError, ValueError):
    """A scan could not be turned into pixels."""


class EmptyFileError(ScanReadError):
    """The file holds no bytes."""


class CorruptFileError(ScanReadError):
    """The file is truncated or damaged, or is not what its extension claims."""


class UnsupportedImageError(ScanReadError):
    """The file is valid but holds something LungViT cannot read as a scan."""


class NoPixelDataError(UnsupportedImageError):
    """A DICOM object without an image (RT plan, ECG waveform, structured report, ...)."""


class DecompressionBombError(ScanReadError):
    """The image would need more memory or time to decode than any real scan does."""


class CheckpointError(LungViTError, ValueError):
    """A model file is missing, damaged, unsafe or does not fit the model it names."""
