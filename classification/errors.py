"""The classification package's errors: one base (`ClassificationError`, a `ValueError`); messages name the file."""

from __future__ import annotations

from hvdtrain.errors import CheckpointError as TrainerCheckpointError

__all__ = ["ClassificationError", "DataError", "ImageReadError", "PixelValueError", "CheckpointError"]


class ClassificationError(ValueError):
    """Base of the classification package's errors."""


class DataError(ClassificationError):
    """A dataset that cannot be used as it is; the message names the file or folder."""


class ImageReadError(DataError):
    """An image file that PIL cannot decode."""


class PixelValueError(ImageReadError):
    """An image with no pixels or with non-finite pixels (float TIFFs): bad data that would train silently."""


class CheckpointError(ClassificationError, TrainerCheckpointError):
    """A weights or checkpoint file that cannot be used (also an `hvdtrain` checkpoint error)."""
