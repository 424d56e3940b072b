"""Metrics that accumulate sufficient statistics locally and reduce once per evaluation.

Per-batch allreduces for logging cost a collective per step and force every rank to visit the same number of
batches; summing statistics (counts, tp/fp/fn, loss sums) locally and reducing them once at the end does not.
"""

from __future__ import annotations

import torch

from . import dist

__all__ = ["Metric", "MeanMetric", "SumMetric"]


class Metric:
    """Subclasses keep their statistics in `self.stats` (a float64 vector) and turn the global sums into numbers.

    `compute()` is the one collective: call it on every rank, the same number of times.
    """

    #: names of the entries of `stats`, in order
    fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.stats = torch.zeros(len(self.fields), dtype=torch.float64)

    def add(self, **values: float) -> None:
        """Add to named statistics (local only)."""
        for name, v in values.items():
            self.stats[self.fields.index(name)] += float(v)

    def finalize(self, totals: dict[str, float]) -> dict[str, float]:
        """Global totals -> reported values. Override."""
        return totals

    def compute(self) -> dict[str, float]:
        totals = dist.allreduce(self.stats, op="sum", name=f"metric.{type(self).__name__}")
        return self.finalize(dict(zip(self.fields, totals.tolist())))


class SumMetric(Metric):
    """Global sums of named quantities, e.g. `SumMetric("tp", "fp", "fn")`."""

    def __init__(self, *fields: str) -> None:
        self.fields = tuple(fields)
        super().__init__()


class MeanMetric(Metric):
    """Global mean of a quantity given as (sum, count) per update: `loss` averaged over samples, say."""

    fields = ("sum", "count")

    def __init__(self, name: str = "mean") -> None:
        self.name = name
        super().__init__()

    def update(self, value_sum: float, count: int) -> None:
        self.add(sum=value_sum, count=count)

    def finalize(self, totals: dict[str, float]) -> dict[str, float]:
        mean = totals["sum"] / totals["count"] if totals["count"] else float("nan")
        return {self.name: mean, "count": totals["count"]}
