"""The Horovod optimizer recipe, written once (each distributed line is marked `# hvd:`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import dist, syncbn

__all__ = [
    "distribute",
    "broadcast_parameters",
    "broadcast_running_stats",
    "sync_batch_norm",
    "synchronize",
    "skip_synchronize",
]


def distribute(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    backward_passes_per_step: int = 1,
    fp16_allreduce: bool = False,
    adasum: bool = False,
):
    """Wrap `optimizer` so that gradients are averaged (or Adasum-combined) across ranks.

    With accumulation, Horovod counts `backward_passes_per_step` backward passes locally and starts the
    allreduce on the last one; the loop calls `step()` once per that many micro-batches. With one rank the
    optimizer is returned as it is.
    """
    if not dist.uses_horovod():
        return optimizer
    import horovod.torch as hvd  # hvd: imported only here and in dist.py

    return hvd.DistributedOptimizer(  # hvd:
        optimizer,
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=backward_passes_per_step,
        op=hvd.Adasum if adasum else hvd.Average,
    )


def broadcast_parameters(model: nn.Module) -> None:
    """Rank 0's weights on every rank before the first step.

    The optimizer state is not broadcast for a fresh start: it is empty and identical everywhere, and
    `hvd.broadcast_optimizer_state` would run a zero-gradient step that moves AdamW weights (horovod#2805).
    Resumed state reaches every rank through the checkpoint (see `checkpoint.load_on_all_ranks`).
    """
    if dist.uses_horovod():
        import horovod.torch as hvd

        hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # hvd:


def broadcast_running_stats(model: nn.Module) -> None:
    """Rank 0's normalisation running statistics on every rank (before validation).

    Each rank's BatchNorm tracks its own batches; the checkpoint holds rank 0's, so validating with rank 0's on
    every rank scores the model that is saved, and the same model a simulated run (whose GPUs other than the
    first leave them alone) scores.
    """
    if dist.uses_horovod():
        import horovod.torch as hvd

        names = ("running_mean", "running_var", "num_batches_tracked")
        buffers = {f"running_stats.{k}": b for k, b in model.named_buffers() if k.rsplit(".", 1)[-1] in names}
        if buffers:
            hvd.broadcast_parameters(buffers, root_rank=0)  # hvd: fixed names, one per buffer


def sync_batch_norm(model: nn.Module, device: torch.device) -> int:
    """Turn `model`'s BatchNorm layers (in place) into synchronised ones; returns how many (0 on one rank: no-op).

    On GPUs Horovod's `hvd.SyncBatchNorm`; on the CPU, which it refuses, `syncbn.CPUSyncBatchNorm`.
    """
    if not dist.uses_horovod():
        return 0
    if device.type == "cuda":
        import horovod.torch as hvd

        return syncbn.convert(model, hvd.SyncBatchNorm)  # hvd: statistics allgathered per layer and forward
    return syncbn.convert(model, syncbn.CPUSyncBatchNorm)


def synchronize(optimizer: torch.optim.Optimizer) -> None:
    """Wait for the gradient allreduce, so gradients can be unscaled or clipped before the step."""
    if hasattr(optimizer, "synchronize"):
        for entry in getattr(optimizer, "_handles", {}).values():  # (handle, ctx) per parameter; None until due
            if isinstance(entry, tuple) and isinstance(entry[0], int):
                dist.wait_quietly(entry[0])
        optimizer.synchronize()  # hvd:


def skip_synchronize(optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
    """Context for `step()` after an explicit `synchronize()` (Horovod would otherwise reduce twice)."""
    return optimizer.skip_synchronize() if hasattr(optimizer, "skip_synchronize") else contextlib.nullcontext()
