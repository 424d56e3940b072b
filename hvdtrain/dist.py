"""The one seam to Horovod: rank set-up, collectives and rank-0 printing.

Everything else in the suite talks to other ranks through this module (and `optim.py` for the optimizer wrapper),
so a run with one process needs no launcher and no Horovod at all, and a `torch.distributed` backend would plug in
here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

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
    "allgather_object",
    "barrier",
    "uses_horovod",
    "wait_quietly",
]

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
            import horovod.torch as hvd  # hvd: imported only here and in optim.py

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


def allgather_object(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank (for small per-case results)."""
    if _hvd is None:
        return [obj]
    return _hvd.allgather_object(obj, name="allgather_object")  # hvd: fixed name, as in broadcast_object


def barrier() -> None:
    if _hvd is not None:
        _hvd.allreduce(torch.zeros(1), name="barrier")  # hvd: a tiny allreduce is a barrier on every backend
