"""Loss statistics pooled over the whole global batch, also when a step has several micro-batches.

A global-batch Dice is a ratio of sums over every sample of the optimizer step: f(S), S = sum of the micro-batches'
statistics s_m over all ranks. With one micro-batch per rank a differentiable allreduce gives it
(`dist.allreduce_sum_grad`). With gradient accumulation or simulated GPUs the micro-batches of a step run one after
another, so no single forward sees S. The trainer then runs two passes per step:

1. Statistics pass, without gradients: every micro-batch of the step is forwarded once (with the dropout stream it
   will train with, running statistics left untouched) and its statistics are summed; one allreduce gives S.
2. Training pass: the loss of micro-batch m sees `S + k (s_m - s_m.detach())`, k = ranks x micro-batches per step.
   Its value is S, so the loss is the global-batch loss f(S); its gradient with respect to s_m is k f'(S). The loop
   divides each micro-batch's loss by the micro-batches per step and the optimizer averages over ranks, so the step's
   gradient is sum_m f'(S) ds_m/dw: exactly the gradient of f(S), linearised at the global statistics.

The price is one forward without gradients per micro-batch (about a third of a step). A statistics function is any
callable the loss applies to additive statistics (the Dice loss's `reduce_fn`); with deep supervision it is called
once per output, in the same order on every pass, which is how the calls are matched between the two passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import dist

__all__ = ["GlobalStats", "running_stats_frozen", "statistics_pass"]


class GlobalStats:
    """A loss's `reduce_fn` that pools its statistics over all micro-batches of a step and all ranks.

    Outside a statistics pass and before the first one (one micro-batch per step, evaluation) it is the
    differentiable sum over ranks.
    """

    def __init__(self) -> None:
        self._mode = "direct"
        self._sums: list[torch.Tensor] = []
        self._calls = 0
        self._scale = 1.0

    def __call__(self, stats: torch.Tensor) -> torch.Tensor:
        if self._mode == "direct":
            return dist.allreduce_sum_grad(stats)
        i, self._calls = self._calls, self._calls + 1
        if self._mode == "collect":
            if i == len(self._sums):
                self._sums.append(stats.detach().clone())
            else:
                self._sums[i] += stats.detach()
            return stats
        total = self._sums[i % len(self._sums)]  # the same output of the next micro-batch
        return total + self._scale * (stats - stats.detach())

    def begin(self) -> None:
        """Start a step's statistics pass."""
        self._mode, self._sums = "collect", []

    def next_micro_batch(self) -> None:
        self._calls = 0

    def finish(self, micro_batches: int) -> None:
        """Sum the pass's statistics over ranks (one allreduce); the training pass then uses them."""
        if not self._sums:
            raise RuntimeError("the statistics pass called the loss's statistics function no time")
        flat = torch.cat([s.reshape(-1) for s in self._sums])
        flat = dist.allreduce(flat, name="pooling.global_stats")  # hvd: one fixed name, waited for
        parts = flat.split([s.numel() for s in self._sums])
        self._sums = [p.view_as(s) for p, s in zip(parts, self._sums)]
        self._scale = float(dist.info().size * micro_batches)
        self._mode, self._calls = "apply", 0


def _tracking_norms(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module, frozen: bool = True) -> Iterator[None]:
    """Normalisation layers' running statistics as they were before the block (batch statistics still used).

    For forwards that a real run would not make on this GPU: the statistics pass, and the micro-batches of
    simulated GPUs other than a rank's first (a real run's checkpoint holds rank 0's running statistics).
    Momentum 0 makes the layer's own update keep the old values (running = 1 x running + 0 x batch): copying them
    back afterwards would bump the buffers' versions, which autograd saved for the backward pass.
    """
    norms = _tracking_norms(model) if frozen else []
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)  # not saved for backward: counted in Python, outside autograd


def statistics_pass(
    model: nn.Module,
    group: Sequence[Any],
    step_fn: Callable[[nn.Module, Any, torch.device], Any],
    stats: GlobalStats,
    reseed: Callable[[int], Any],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> None:
    """Forward every micro-batch of a step without gradients and pool the loss's statistics over ranks.

    `reseed(m)` sets micro-batch m's dropout stream, as the training pass will.
    """
    stats.begin()
    with torch.no_grad(), running_stats_frozen(model):
        for m, batch in enumerate(group):
            reseed(m)
            stats.next_micro_batch()
            with autocast():
                step_fn(model, batch, device)
    stats.finish(len(group))
