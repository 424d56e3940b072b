"""Weak and strong scaling: the per-GPU batch, accumulation and peak LR for a run on a number of GPUs.

Weak scaling (the default): the per-GPU batch and accumulation are as configured, the global batch grows with the
GPU count and the peak LR follows --lr-rule. Strong scaling (--global-batch G): G stays fixed; each GPU takes
G / GPUs samples per step, as the largest micro-batch not above --batch-size-per-gpu (what fits in memory) that
divides them, times the accumulation steps that make up the rest. The LR is not rescaled: --lr is the LR of the
global batch G, so batch, steps per epoch and schedule are the same at every GPU count and only the time changes.
GPUs = real ranks x simulated GPUs.

A batch -> (LR, warmup) table (--lr-table, as MLPerf's 3D U-Net gives one: jobs/configs/lr_table_mlperf_unet3d.yaml)
replaces the rule in both: the run's global batch picks the row with the largest batch not above it, whose LR is
the peak and whose warmup is --warmup-epochs (the ramp starts from --lr). A step function, not an interpolation:
such tables are tuned at a few batch sizes and need not be monotone (MLPerf's LR falls above a batch of 32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .config import TrainConfig
from .errors import BatchingError
from .schedule import scale_lr

__all__ = [
    "BatchingError",
    "LRRow",
    "split_global_batch",
    "parse_lr_table",
    "lr_table_row",
    "resolve",
    "peak_lr",
    "check",
]

C = TypeVar("C", bound=TrainConfig)
LRRow = tuple[int, float, float]  # (global batch, peak LR, warmup epochs)


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


def _row(entry: Any, where: str) -> LRRow:
    parts = entry.split(":") if isinstance(entry, str) else entry
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence) or len(parts) != 3:
        # YAML 1.1 reads an unquoted 80:1:15 as a base-60 integer.
        hint = " (quote rows in YAML: an unquoted 80:1:15 is a base-60 number)" if isinstance(entry, int) else ""
        raise BatchingError(
            f"{where}: an --lr-table row is 'BATCH:LR:WARMUP' or, in YAML, [BATCH, LR, WARMUP]; got {entry!r}{hint}"
        )
    try:
        batch, lr, warmup = float(parts[0]), float(parts[1]), float(parts[2])
        g = int(batch)
    except (TypeError, ValueError, OverflowError):
        raise BatchingError(f"{where}: an --lr-table row needs numbers BATCH:LR:WARMUP, got {entry!r}") from None
    if g < 1 or batch != g or not lr > 0 or not warmup >= 0:
        raise BatchingError(f"{where}: --lr-table row {entry!r} needs a whole batch >= 1, LR > 0 and warmup >= 0")
    return g, lr, warmup


def parse_lr_table(entries: Sequence[Any]) -> tuple[LRRow, ...]:
    """--lr-table as rows (global batch, peak LR, warmup epochs), sorted by batch.

    `entries` are rows "G:LR:WARMUP" (flags), [G, LR, WARMUP] (YAML), or one .yaml/.yml/.json file whose
    `lr_table` holds such rows (a preset such as jobs/configs/lr_table_mlperf_unet3d.yaml).

    Raises:
        BatchingError: a malformed row, a repeated batch, or a file without rows.
    """
    where = "--lr-table"
    if len(entries) == 1 and isinstance(entries[0], str) and entries[0].lower().endswith((".yaml", ".yml", ".json")):
        path = Path(entries[0])
        if not path.is_file():
            raise BatchingError(f"--lr-table file {path} does not exist")
        data = yaml.safe_load(path.read_text())  # YAML reads JSON too
        entries = data.get("lr_table", data.get("lr-table")) if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise BatchingError(f"--lr-table file {path}: expected `lr_table:` with a list of [BATCH, LR, WARMUP] rows")
        where = f"--lr-table file {path}"
    rows = tuple(sorted(_row(e, where) for e in entries))
    repeated = sorted({r[0] for r in rows if sum(q[0] == r[0] for q in rows) > 1})
    if repeated:
        raise BatchingError(f"{where}: global batch {repeated[0]} has more than one row")
    return rows


def lr_table_row(rows: Sequence[Any], global_batch: int) -> LRRow:
    """The row for `global_batch`: the one with the largest batch <= it (rows as `parse_lr_table` takes them).

    Raises:
        BatchingError: `global_batch` is below the table's smallest batch (the message names both).
    """
    table = parse_lr_table(rows)
    fitting = [r for r in table if r[0] <= global_batch]
    if not fitting:
        raise BatchingError(
            f"--lr-table has no row for global batch {global_batch}: its smallest batch is {table[0][0]} (rows apply "
            f"from their batch up to the next row's); add a row at or below {global_batch}"
        )
    return fitting[-1]


def _global_batch(cfg: TrainConfig, gpus: int) -> int:
    return cfg.global_batch if cfg.global_batch is not None else cfg.batch_size_per_gpu * gpus * cfg.accum


def resolve(cfg: C, ranks: int) -> C:
    """`cfg` with `batch_size_per_gpu` and `accum` derived from `global_batch` (as it is for weak scaling), and with
    --lr-table: the table's rows written out (a file's too, so config.json holds the numbers) and `warmup_epochs`
    from the row of the run's global batch.

    Call before building the training loader. Idempotent: a config that is already resolved is returned as is.
    """
    g, gpus = cfg.global_batch, ranks * cfg.simulate_gpus
    if g is not None and cfg.batch_size_per_gpu * gpus * cfg.accum != g:
        if cfg.accum != 1:
            raise BatchingError(f"--global-batch derives the accumulation: leave --accum at 1 (got {cfg.accum})")
        batch, accum = split_global_batch(g, gpus, cfg.batch_size_per_gpu)
        cfg = dataclasses.replace(cfg, batch_size_per_gpu=batch, accum=accum)
    if cfg.lr_table:
        rows = tuple(f"{b}:{lr!r}:{w!r}" for b, lr, w in parse_lr_table(cfg.lr_table))  # as --lr-table takes them
        warmup = lr_table_row(rows, _global_batch(cfg, gpus))[2]
        if tuple(cfg.lr_table) != rows or cfg.warmup_epochs != warmup:
            cfg = dataclasses.replace(cfg, lr_table=rows, warmup_epochs=warmup)
    return cfg


def check(cfg: TrainConfig, ranks: int) -> int:
    """The global batch of `cfg` on `ranks` ranks; raises when a --global-batch config was not resolved."""
    g = cfg.batch_size_per_gpu * ranks * cfg.simulate_gpus * cfg.accum
    if cfg.global_batch is not None and g != cfg.global_batch:
        raise BatchingError(
            f"--global-batch {cfg.global_batch}, but {cfg.batch_size_per_gpu}/GPU x {ranks * cfg.simulate_gpus} GPU(s) "
            f"x accum {cfg.accum} = {g}: pass the config through hvdtrain.batching.resolve before building the loader"
        )
    if cfg.lr_table and cfg.warmup_epochs != lr_table_row(cfg.lr_table, g)[2]:
        raise BatchingError(
            f"--lr-table gives global batch {g} a warmup of {lr_table_row(cfg.lr_table, g)[2]:g} epochs, the config "
            f"{cfg.warmup_epochs:g}: pass the config through hvdtrain.batching.resolve before building the loader"
        )
    return g


def peak_lr(cfg: TrainConfig, gpus: int) -> float:
    """--lr scaled by --lr-rule over GPUs x accumulation (weak scaling); as given for strong scaling and Adasum.

    With --lr-table: the LR of the table's row for the run's global batch, in weak and strong scaling alike (a
    table gives the LR outright, so neither the rule nor Adasum's no-scaling applies).
    """
    if cfg.lr_table:
        return lr_table_row(cfg.lr_table, _global_batch(cfg, gpus))[1]
    if cfg.global_batch is not None or cfg.adasum:  # Adasum combines gradients without averaging: no scaling
        return cfg.lr
    return scale_lr(cfg.lr, cfg.lr_rule, gpus * cfg.accum)
