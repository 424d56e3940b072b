"""The errors hvdtrain raises on purpose: one hierarchy, so a job can catch them all (`HvdtrainError`).

Each is also a `ValueError` (bad input: a config, a batch split, a checkpoint file), and its message names the file
or the flag and the problem.
"""

from __future__ import annotations

__all__ = ["HvdtrainError", "ConfigError", "BatchingError", "CheckpointError"]


class HvdtrainError(ValueError):
    """Base of hvdtrain's errors."""


class ConfigError(HvdtrainError):
    """A config file or flag that cannot be used."""


class BatchingError(HvdtrainError):
    """A global batch that cannot be split over the GPUs; the message says what would work."""


class CheckpointError(HvdtrainError):
    """A checkpoint that cannot be read or does not fit the run."""
