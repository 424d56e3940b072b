"""The one seam to Horovod: rank set-up, collectives, rank-0 printing and the optimizer recipe.

Everything else in the suite talks to other ranks through this module (ruff bans `import horovod` elsewhere in
hvdtrain), so a run with one process needs no launcher and no Horovod at all, and a `torch.distributed` backend would
replace this file.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "DistInfo",
    "init",
    "info",
    "is_main",
    "print0",
    "allreduce",
    "allreduce_sum_grad",
    "broadcast_object",
    "on_main_then_broadcast",
    "allgather_object",
    "barrier",
    "uses_horovod",
    "wait_quietly",
    "distribute_optimizer",
    "broadcast_parameters",
    "broadcast_running_stats",
    "horovod_sync_batch_norm",
    "synchronize",
    "skip_synchronize",
]

T = TypeVar("T")

# Environment variables that a launcher sets; their presence means we must run under Horovod.
_LAUNCHER_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    size: int
    local_size: int


_info: DistInfo | None = None
_hvd: Any = None  # horovod.torch once initialised with size > 1


def _launched_size() -> int:
    for var in _LAUNCHER_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def init(threads: int | None = None, stall_timeout: float = 0.0) -> DistInfo:
    """Initialise the ranks (idempotent) and set the per-rank CPU thread count.

    Under a launcher (horovodrun, mpirun, srun) Horovod is initialised; a plain `python` run is one rank without
    Horovod. Threads default to cores / local ranks so that ranks sharing a node do not oversubscribe it. With
    `stall_timeout` (the watchdog's, in seconds) Horovod's stall inspector names the ranks that did not arrive before
    the watchdog ends the job.
    """
    global _info, _hvd
    if _info is None:
        if _launched_size() > 1:
            if stall_timeout > 0:  # read by hvd.init(); an explicit setting in the environment wins
                from .watchdog import stall_check_seconds

                os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(stall_check_seconds(stall_timeout)))
            import horovod.torch as hvd  # hvd: the only import of Horovod in hvdtrain (ruff bans others)

            hvd.init()  # hvd:
            _hvd = hvd
            _info = DistInfo(hvd.rank(), hvd.local_rank(), hvd.size(), hvd.local_size())
        else:
            _info = DistInfo(0, 0, 1, 1)
        if torch.cuda.is_available():
            # Pin before any CUDA allocation so nothing lands on GPU 0 by accident.
            torch.cuda.set_device(_info.local_rank % torch.cuda.device_count())
    omp = os.environ.get("OMP_NUM_THREADS", "")
    # An explicit count wins, then OMP_NUM_THREADS (what Slurm templates set from --cpus-per-task), then a share
    # of the node's cores (affinity-aware: a Slurm step may own fewer cores than the node has).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = threads or (int(omp) if omp.isdigit() and int(omp) > 0 else max(1, cores // _info.local_size))
    torch.set_num_threads(n)
    return _info


def info() -> DistInfo:
    """The current ranks; initialises on first use."""
    return _info if _info is not None else init()


def uses_horovod() -> bool:
    """True when collectives go through Horovod (more than one rank)."""
    info()
    return _hvd is not None


def is_main() -> bool:
    return info().rank == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, flushed so that launcher logs interleave sensibly."""
    if is_main():
        print(*args, **kwargs, flush=True)


def allreduce(x: Any, op: str = "sum", name: str | None = None) -> Any:
    """Sum or mean of `x` over ranks; `x` is a tensor, a numpy array or a Python number; returns the same kind."""
    if op not in ("sum", "mean"):
        raise ValueError(f"allreduce op must be 'sum' or 'mean', got {op!r}")
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, (int, float, np.number)):
        t = torch.tensor(float(x), dtype=torch.float64)
    else:
        raise TypeError(f"allreduce takes a tensor, numpy array or number, got {type(x).__name__}")
    # float64 keeps sums of counts exact; sum then divide so both ops share one code path.
    out = t.to(torch.float64) if not t.is_floating_point() else t.clone()
    if _hvd is not None:
        # A fixed name: unnamed ops get a fresh name each call, and names per shape one per volume size; both
        # flood Horovod's response cache. The op is waited for here, so the name is never in flight twice.
        name = name or f"allreduce.{out.dtype}"
        handle = _hvd.allreduce_async(out, op=_hvd.Sum, name=name)  # hvd:
        wait_quietly(handle)
        out = _hvd.synchronize(handle)
    if op == "mean":
        out = out / info().size
    keep_int = op == "sum" or t.is_floating_point()  # a mean of integers is a float
    if isinstance(x, torch.Tensor):
        return out.to(t.dtype) if keep_int else out
    if isinstance(x, np.ndarray):
        return out.numpy().astype(x.dtype) if keep_int else out.numpy()
    return int(round(out.item())) if isinstance(x, (int, np.integer)) and op == "sum" else out.item()


def wait_quietly(handle: int, sleep_s: float = 20e-6) -> None:
    """Wait for a Horovod handle with short sleeps (then `synchronize` returns at once).

    `hvd.synchronize` spins on the CPU until the background thread finishes; with as many ranks as cores the
    spinning threads take the cores that the background threads (MPI's progress loop) need, and a 2-rank
    allreduce on a 2-core node ran several times slower (`python -m jobs.bench_allreduce`, "spin-wait" rows).
    """
    while not _hvd.poll(handle):
        time.sleep(sleep_s)


def allreduce_sum_grad(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (identity with one rank): for losses that need global-batch statistics."""
    if _hvd is None:
        return t
    return _SumGrad.apply(t)


class _SumGrad(torch.autograd.Function):
    """Sum over ranks whose backward is a sum too, both under fixed names.

    horovod.torch's own autograd allreduce leaves the backward op unnamed: Horovod then names it afresh on every
    call ("allreduce.noname.N"), each step adds entries to its response cache until it evicts ("A response has
    been evicted from cache"), and names made per shape do the same with volumes of varying size. Both ops are
    synchronous, so one name per direction is never in flight twice.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return _hvd.allreduce(t, op=_hvd.Sum, name=f"sum_grad.{t.dtype}")  # hvd:

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _hvd.allreduce(grad.contiguous(), op=_hvd.Sum, name=f"sum_grad.backward.{grad.dtype}")  # hvd:


def broadcast_object(obj: Any, root: int = 0) -> Any:
    """Rank `root`'s object on every rank (pickled; for configs, parameters and small results)."""
    if _hvd is None:
        return obj
    # A fixed name: Horovod otherwise names the op after the object's type, and ranks passing different types
    # (rank 0 a dict, the others None) wait on different collectives forever.
    return _hvd.broadcast_object(obj, root_rank=root, name="broadcast_object")  # hvd:


def on_main_then_broadcast(fn: Callable[[], T], errors: tuple[type[BaseException], ...] = (OSError, ValueError)) -> T:
    """Rank 0 runs `fn` (scanning, splitting, writing files); every rank returns its result, or raises its error.

    Without carrying the error, a failure on rank 0 would leave the other ranks waiting in the broadcast forever.
    """
    outcome: Any = None
    if is_main():
        try:
            outcome = (True, fn())
        except errors as e:
            outcome = (False, e)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def allgather_object(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank (for small per-case results)."""
    if _hvd is None:
        return [obj]
    return _hvd.allgather_object(obj, name="allgather_object")  # hvd: fixed name, as in broadcast_object


def barrier() -> None:
    if _hvd is not None:
        _hvd.allreduce(torch.zeros(1), name="barrier")  # hvd: a tiny allreduce is a barrier on every backend


# The optimizer recipe: gradient averaging, the initial broadcast, waiting for the allreduce.


def distribute_optimizer(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    backward_passes_per_step: int = 1,
    fp16_allreduce: bool = False,
    adasum: bool = False,
):
    """Wrap `optimizer` so that gradients are averaged (or Adasum-combined) across ranks.

    With accumulation, Horovod counts `backward_passes_per_step` backward passes locally and starts the
    allreduce on the last one; the loop calls `step()` once per that many micro-batches. With one rank the
    optimizer is returned as it is.
    """
    if _hvd is None:
        return optimizer
    return _hvd.DistributedOptimizer(  # hvd:
        optimizer,
        named_parameters=model.named_parameters(),
        compression=_hvd.Compression.fp16 if fp16_allreduce else _hvd.Compression.none,
        backward_passes_per_step=backward_passes_per_step,
        op=_hvd.Adasum if adasum else _hvd.Average,
    )


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights on every rank before the first step.

    The optimizer state is not broadcast for a fresh start: it is empty and identical everywhere, and
    `hvd.broadcast_optimizer_state` would run a zero-gradient step that moves AdamW weights (horovod#2805).
    Resumed state reaches every rank through the checkpoint (see `checkpoint.load_on_all_ranks`).
    """
    if _hvd is not None:
        _hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # hvd:


def broadcast_running_stats(model: torch.nn.Module) -> None:
    """Rank 0's normalisation running statistics on every rank (before validation).

    Each rank's BatchNorm tracks its own batches; the checkpoint holds rank 0's, so validating with rank 0's on
    every rank scores the model that is saved, and the same model a simulated run (whose GPUs other than the
    first leave them alone) scores.
    """
    if _hvd is not None:
        names = ("running_mean", "running_var", "num_batches_tracked")
        buffers = {f"running_stats.{k}": b for k, b in model.named_buffers() if k.rsplit(".", 1)[-1] in names}
        if buffers:
            _hvd.broadcast_parameters(buffers, root_rank=0)  # hvd: fixed names, one per buffer


def horovod_sync_batch_norm() -> type[torch.nn.Module]:
    """Horovod's SyncBatchNorm layer class (GPU tensors only); call under Horovod."""
    if _hvd is None:
        raise RuntimeError("Horovod's SyncBatchNorm needs a run under horovodrun (more than one rank)")
    return _hvd.SyncBatchNorm  # hvd: statistics allgathered per layer and forward


def synchronize(optimizer: torch.optim.Optimizer) -> None:
    """Wait for the gradient allreduce, so gradients can be unscaled or clipped before the step."""
    if hasattr(optimizer, "synchronize"):
        for entry in getattr(optimizer, "_handles", {}).values():  # (handle, ctx) per parameter; None until due
            if isinstance(entry, tuple) and isinstance(entry[0], int):
                wait_quietly(entry[0])
        optimizer.synchronize()  # hvd:


def skip_synchronize(optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
    """Context for `step()` after an explicit `synchronize()` (Horovod would otherwise reduce twice)."""
    return optimizer.skip_synchronize() if hasattr(optimizer, "skip_synchronize") else contextlib.nullcontext()
