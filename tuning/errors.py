"""The tuning package's errors have one base, `TuningError` (a `ValueError`), so a job can catch them together."""

from __future__ import annotations

__all__ = ["TuningError"]


class TuningError(ValueError):
    """Base of the tuning package's errors (space, study, report, transfer); the message says what to change."""
