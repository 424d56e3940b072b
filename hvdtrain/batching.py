"""Weak and strong scaling: the per-GPU batch, accumulation and peak LR for a run on a number of GPUs.

Weak scaling (the default): the per-GPU batch and accumulation are as configured, the global batch grows with the
GPU count and the peak LR follows --lr-rule. Strong scaling (--global-batch G): G stays fixed; each GPU takes
G / GPUs samples per step, as the largest micro-batch not above --batch-size-per-gpu (what fits in memory) that
divides them, times the accumulation steps that make up the rest. The LR is not rescaled: --lr is the LR of the
global batch G, so batch, steps per epoch and schedule are the same at every GPU count and only the time changes.
GPUs = real ranks x simulated GPUs.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from .config import TrainConfig
from .errors import BatchingError
from .schedule import scale_lr

__all__ = ["BatchingError", "split_global_batch", "resolve", "peak_lr", "check"]

C = TypeVar("C", bound=TrainConfig)


def split_global_batch(global_batch: int, gpus: int, max_per_gpu: int) -> tuple[int, int]:
    """(per-GPU micro-batch <= max_per_gpu, accumulation steps) whose product x gpus is `global_batch`."""
    if global_batch < 1 or gpus < 1 or max_per_gpu < 1:
        raise BatchingError(
            f"global batch, GPUs and per-GPU batch must be >= 1, got {global_batch}, {gpus}, {max_per_gpu}"
        )
    if global_batch % gpus:
        lower, upper = global_batch // gpus * gpus, (global_batch // gpus + 1) * gpus
        raise BatchingError(
            f"--global-batch {global_batch} does not divide over {gpus} GPU(s) (ranks x simulated GPUs): choose a "
            f"multiple of {gpus}" + (f" such as {lower} or {upper}" if lower else f" such as {upper}")
        )
    per = global_batch // gpus
    batch = max(d for d in range(1, min(per, max_per_gpu) + 1) if per % d == 0)
    return batch, per // batch


def resolve(cfg: C, ranks: int) -> C:
    """`cfg` with `batch_size_per_gpu` and `accum` derived from `global_batch` (as it is for weak scaling).

    Call before building the training loader. Idempotent: a config that already splits G this way is returned.
    """
    g, gpus = cfg.global_batch, ranks * cfg.simulate_gpus
    if g is None or cfg.batch_size_per_gpu * gpus * cfg.accum == g:
        return cfg
    if cfg.accum != 1:
        raise BatchingError(f"--global-batch derives the accumulation: leave --accum at 1 (got {cfg.accum})")
    batch, accum = split_global_batch(g, gpus, cfg.batch_size_per_gpu)
    return dataclasses.replace(cfg, batch_size_per_gpu=batch, accum=accum)


def check(cfg: TrainConfig, ranks: int) -> int:
    """The global batch of `cfg` on `ranks` ranks; raises when a --global-batch config was not resolved."""
    g = cfg.batch_size_per_gpu * ranks * cfg.simulate_gpus * cfg.accum
    if cfg.global_batch is not None and g != cfg.global_batch:
        raise BatchingError(
            f"--global-batch {cfg.global_batch}, but {cfg.batch_size_per_gpu}/GPU x {ranks * cfg.simulate_gpus} GPU(s) "
            f"x accum {cfg.accum} = {g}: pass the config through hvdtrain.batching.resolve before building the loader"
        )
    return g


def peak_lr(cfg: TrainConfig, gpus: int) -> float:
    """--lr scaled by --lr-rule over GPUs x accumulation (weak scaling); as given for strong scaling and Adasum."""
    if cfg.global_batch is not None or cfg.adasum:  # Adasum combines gradients without averaging: no scaling
        return cfg.lr
    return scale_lr(cfg.lr, cfg.lr_rule, gpus * cfg.accum)
