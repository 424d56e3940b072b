"""Simulated SyncBatchNorm: a step's simulated GPUs forwarded as one batch.

With `--sync-bn` a real N-rank step normalises every BatchNorm layer with statistics of all N micro-batches at once,
and its backward sums the statistics' gradients over the ranks: layer by layer, every GPU's forward and backward
depend on every other's. Simulated GPUs that run one after another cannot do that (each would see its own batch
statistics), and no statistics pass can stand in for it: a layer's global statistics depend on the layers below
being normalised with theirs, and its input gradient on the other GPUs' output gradients. So the twin runs the
simulated GPUs of one accumulation index as ONE batch, which is what a synchronised BatchNorm computes:

* each simulated GPU's micro-batch is prepared on its own random stream (mixup/cutmix draws), as that GPU would;
* the prepared inputs are concatenated and forwarded once; BatchNorm sees the global batch (with real ranks too:
  the layers are then `CPUSyncBatchNorm`/`hvd.SyncBatchNorm` over the ranks' concatenated batches), and its running
  statistics are updated once per forward, with the global statistics, as a real SyncBN run's are on every rank;
* dropout layers draw each GPU's slice of the batch from that GPU's stream (`chunked_dropout`), so the masks are
  bit for bit those of the real ranks;
* the output is split back per GPU and each GPU's loss is taken on its own slice; their mean is the step's loss.
  A loss pooled over the global batch (`GlobalStats`, the U-Net's global Dice) first sums its statistics over the
  slices (and ranks), then each slice's loss is linearised at the total, as in `hvdtrain.pooling`.

The price: the simulated GPUs' activations of a step are in memory at once (as on one GPU with the global batch).
The step function must come in two halves (`hvdtrain.run.SplitStep`): the trainer forwards between them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .run import SplitStep

__all__ = ["Groups", "chunked_dropout", "fused_step", "split_output"]

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class Groups:
    """A loader's micro-batches regrouped per optimizer step into one group per accumulation index.

    The sampler hands out a rank's micro-batches of a step simulated GPU by GPU (micro = j x accum + a); group a
    holds the (micro index, batch) pairs of every simulated GPU j for accumulation index a.
    """

    def __init__(self, loader, simulate_gpus: int, accum: int):
        self.loader, self.sim, self.accum = loader, simulate_gpus, accum

    def __len__(self) -> int:
        return len(self.loader) // self.sim

    def __iter__(self) -> Iterator[list[tuple[int, Any]]]:
        step: list = []
        for batch in self.loader:
            step.append(batch)
            if len(step) == self.sim * self.accum:
                for a in range(self.accum):
                    yield [(j * self.accum + a, step[j * self.accum + a]) for j in range(self.sim)]
                step = []


def split_output(out: Any, sizes: Sequence[int]) -> list[Any]:
    """`out` (a tensor, or tuples/lists of them, e.g. deep supervision) split on dim 0 into `sizes` pieces."""
    if isinstance(out, torch.Tensor):
        return list(out.split(list(sizes)))
    if isinstance(out, (tuple, list)):
        parts = [split_output(o, sizes) for o in out]
        return [type(out)(p[i] for p in parts) for i in range(len(sizes))]
    raise TypeError(f"cannot split a model output of type {type(out).__name__} per simulated GPU")


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def chunked_dropout(model: nn.Module, sizes: Sequence[int], states: list, device: torch.device) -> Iterator[None]:
    """Inside, each dropout layer of `model` drops slice j of its batch (`sizes[j]` samples) with random state
    `states[j]`, and leaves that stream's new state in `states[j]`: the masks GPU j would draw on its own."""

    def chunked(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            out = []
            for j, piece in enumerate(x.split(list(sizes))):
                _set_rng_state(states[j], device)
                out.append(forward(piece))
                states[j] = _rng_state(device)
            return torch.cat(out)

        return run

    layers = [m for m in model.modules() if isinstance(m, _DROPOUTS) and m.training and m.p > 0]
    for m in layers:
        m.forward = chunked(m.forward)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def fused_step(
    model: nn.Module, group: list[tuple[int, Any]], step: SplitStep, reseed: Callable[[int], Any], device: torch.device
) -> tuple[torch.Tensor, int]:
    """(mean loss over the group's GPUs, samples) of one forward of all their micro-batches (`Groups` order)."""
    prepared, states = [], []
    for m, batch in group:
        reseed(m)  # GPU j's stream: its mixup/cutmix draws, then its dropout masks
        prepared.append(step.prepare(batch, device))
        states.append(_rng_state(device))
    sizes = [p[0].shape[0] for p in prepared]
    kwargs = prepared[0][1]
    with chunked_dropout(model, sizes, states, device):
        out = model(torch.cat([p[0] for p in prepared]), **kwargs)
    finishes, outs = [p[2] for p in prepared], split_output(out, sizes)
    stats = step.global_stats
    if stats is not None:  # a global-batch loss: pool its sums over the slices first (hvdtrain.pooling)
        stats.begin()
        with torch.no_grad():
            for finish, o in zip(finishes, outs):
                stats.next_micro_batch()
                finish(o)
        stats.finish(len(group))
    results = []
    for finish, o in zip(finishes, outs):
        if stats is not None:
            stats.next_micro_batch()
        results.append(finish(o))
    return torch.stack([loss for loss, _ in results]).mean(), sum(n for _, n in results)
