"""Carry a tuned recipe from the GPUs it was tuned on to N GPUs: global batch, learning rate, warmup, epochs.

The trainers read `lr` as the learning rate for *one* GPU's batch and scale it themselves by `lr_rule` over
GPUs x accumulation (hvdtrain.schedule.scale_lr), ramping from `lr` to the scaled peak over `warmup_epochs`.
A plan keeps that meaning: it writes the `lr` and `lr_rule` that make the trainer reach the intended peak.

Two ways to go to N GPUs:

* grow the global batch (per-GPU batch and accumulation as tuned): the peak LR follows `rule`
  (linear: x k, Goyal et al. 2017; sqrt: x sqrt(k), Krizhevsky 2014; none: unchanged) for k = N / tuned GPUs,
  the warmup is lengthened to `warmup` epochs (a large LR from the first step diverges), and the epochs grow by
  the added warmup so the post-warmup schedule is as long as the tuned one;
* `keep_global_batch`: per-GPU batch x accumulation = tuned global batch / N, the same peak LR with no
  scaling rule (`lr_rule: none`), warmup and epochs as tuned: the optimisation is the tuned one, only faster.

The `table` rule takes the peak LR and the warmup from a batch -> (LR, warmup) table instead (MLPerf's 3D U-Net
table: jobs/configs/lr_table_mlperf_unet3d.yaml), for the global batch of either way: the plan writes the table
into the config (`lr_table`, which the trainer reads the same way, hvdtrain.batching) with the row's warmup, and
the epochs grow by the warmup added over the tuned one. The tuned `lr` stays as the start of the warmup ramp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hvdtrain.batching import BatchingError, LRRow, lr_table_row, parse_lr_table, split_global_batch
from hvdtrain.schedule import scale_lr

from .errors import TuningError

__all__ = ["RULES", "ScaleError", "Reference", "Plan", "lr_factor", "plan_for"]

RULES = ("linear", "sqrt", "none", "table")


class ScaleError(TuningError):
    """A GPU count the tuned recipe cannot be carried to; the message says why and what to do."""


def lr_factor(rule: str, k: float) -> float:
    """LR multiplier for a global batch `k` times the tuned one (`hvdtrain.schedule.scale_lr`'s rules)."""
    if rule == "table":
        raise ScaleError("the table rule gives the LR from its rows, not as a factor: pass the table to plan_for")
    if rule not in RULES:
        raise ScaleError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    return scale_lr(1.0, rule, k)


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


@dataclass(frozen=True)
class Reference:
    """The recipe as tuned."""

    gpus: int  # GPUs the trials ran on (ranks x simulate_gpus)
    batch_size_per_gpu: int
    accum: int
    lr: float  # the config's base LR (one GPU's batch)
    lr_rule: str  # the rule the trainer applied while tuning
    warmup_epochs: float
    epochs: int
    train_samples: int | None = None  # training samples per epoch, when known (steps per epoch follow)
    lr_table: tuple[str, ...] = ()  # the config's lr_table, when the trials took their LR from one

    @property
    def global_batch(self) -> int:
        return self.batch_size_per_gpu * self.gpus * self.accum

    @property
    def peak_lr(self) -> float:
        """The LR the tuned trials actually trained at (after warmup)."""
        if self.lr_table:
            return lr_table_row(self.lr_table, self.global_batch)[1]
        return scale_lr(self.lr, self.lr_rule, self.gpus * self.accum)


@dataclass(frozen=True)
class Plan:
    """The config changes for one GPU count, with the reasons."""

    gpus: int
    batch_size_per_gpu: int
    accum: int
    lr: float
    lr_rule: str
    warmup_epochs: float
    epochs: int
    global_batch: int
    peak_lr: float
    steps_per_epoch: int | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    lr_table: tuple[LRRow, ...] = ()  # the table rule's rows (none for the other rules: the config drops lr_table)

    def changes(self) -> dict[str, Any]:
        """Config fields to set (over the tuned config) for this GPU count; `lr_table` None: remove it."""
        return {
            "lr_table": [list(row) for row in self.lr_table] or None,
            "batch_size_per_gpu": self.batch_size_per_gpu,
            "accum": self.accum,
            "simulate_gpus": 1,
            "lr": self.lr,
            "lr_rule": self.lr_rule,
            "warmup_epochs": self.warmup_epochs,
            "epochs": self.epochs,
        }


def _split_batch(global_batch: int, gpus: int, max_per_gpu: int) -> tuple[int, int]:
    """(per-GPU batch, accumulation) with per-GPU batch <= the tuned one, whose product x gpus = global_batch."""
    if global_batch % gpus:
        raise ScaleError(
            f"{gpus} GPUs: the tuned global batch {global_batch} does not split evenly over them; "
            "drop --keep-global-batch or pick GPU counts that divide it"
        )
    return split_global_batch(global_batch, gpus, max_per_gpu)  # the trainers' --global-batch rule


def _steps(train_samples: int | None, global_batch: int, gpus: int) -> int | None:
    if train_samples is None:
        return None
    steps = train_samples // global_batch
    if steps == 0:
        raise ScaleError(
            f"{gpus} GPUs: a global batch of {global_batch} is more than the {train_samples} training samples "
            "(no full step per epoch); use --keep-global-batch or fewer GPUs"
        )
    return steps


def _table_plan(ref: Reference, gpus: int, table: tuple[LRRow, ...], keep_global_batch: bool) -> Plan:
    """The plan of the `table` rule: peak LR and warmup from the row of the global batch on `gpus` GPUs."""
    if keep_global_batch:
        batch, accum = _split_batch(ref.global_batch, gpus, ref.batch_size_per_gpu)
    else:
        batch, accum = ref.batch_size_per_gpu, ref.accum
    g = batch * gpus * accum
    try:
        row_batch, peak, warm = lr_table_row(table, g)
    except BatchingError as e:
        raise ScaleError(f"{gpus} GPUs: {e}") from None
    steps = _steps(ref.train_samples, g, gpus)
    epochs = ref.epochs + max(0, math.ceil(warm - ref.warmup_epochs))
    how = f"{g} (as tuned)" if g == ref.global_batch else f"{ref.global_batch} -> {g}"
    notes = [
        f"global batch {how}: {batch}/GPU x {gpus} GPU(s) x accum {accum}",
        f"peak LR {ref.peak_lr:.4g} -> {peak:.4g} and warmup {ref.warmup_epochs:g} -> {warm:g} epochs from the table's "
        f"row for batch {row_batch} (lr_table in the config; lr_rule none: the trainer does not rescale it)",
        f"the warmup ramps from lr {ref.lr:.4g}, the tuned base LR",
    ]
    if epochs != ref.epochs:
        notes.append(f"epochs {ref.epochs} -> {epochs}: the added warmup comes on top of the tuned schedule")
    if steps is not None:
        notes.append(f"{steps} optimizer step(s) per epoch on {ref.train_samples} samples")
    return Plan(gpus, batch, accum, ref.lr, "none", warm, epochs, g, _sig(peak), steps, tuple(notes), table)


def plan_for(
    ref: Reference,
    gpus: int,
    rule: str,
    warmup: float,
    keep_global_batch: bool = False,
    table: Any = None,
) -> Plan:
    """The plan for `gpus` GPUs (see the module docstring); `table`: the rows of the `table` rule.

    Raises:
        ScaleError: a count the recipe cannot be carried to, an unknown rule, or the table rule without rows.
    """
    if gpus < 1:
        raise ScaleError(f"GPU counts must be >= 1, got {gpus}")
    if rule == "table":
        if not table:
            raise ScaleError("the table rule needs a batch -> (LR, warmup) table: --lr-table FILE or lr_table in best")
        try:
            rows = parse_lr_table(table)
        except BatchingError as e:
            raise ScaleError(str(e)) from None
        return _table_plan(ref, gpus, rows, keep_global_batch)
    lr_factor(rule, 1.0)  # validates the rule name
    peak0, g0 = ref.peak_lr, ref.global_batch
    notes = []
    if keep_global_batch:
        batch, accum = _split_batch(g0, gpus, ref.batch_size_per_gpu)
        steps = _steps(ref.train_samples, g0, gpus)
        notes.append(
            f"global batch kept at {g0} = {batch}/GPU x {gpus} GPU(s) x accum {accum} (tuned: "
            f"{ref.batch_size_per_gpu}/GPU x {ref.gpus} x accum {ref.accum})"
        )
        notes.append(f"peak LR {peak0:.4g} as tuned: lr_rule none so the trainer does not rescale it")
        notes.append(f"warmup {ref.warmup_epochs:g} and epochs {ref.epochs} as tuned (same steps per epoch)")
        return Plan(gpus, batch, accum, _sig(peak0), "none", ref.warmup_epochs, ref.epochs, g0, _sig(peak0), steps,
                    tuple(notes))  # fmt: skip
    batch, accum = ref.batch_size_per_gpu, ref.accum
    g = batch * gpus * accum
    k = g / g0
    peak = peak0 * lr_factor(rule, k)
    # The base LR for which the trainer's own scaling (rule over GPUs x accum) reaches `peak`.
    lr = peak / lr_factor(rule, gpus * accum)
    steps = _steps(ref.train_samples, g, gpus)
    grows = k > 1 and rule != "none"
    warm = max(ref.warmup_epochs, warmup) if grows else ref.warmup_epochs
    epochs = ref.epochs + math.ceil(warm - ref.warmup_epochs)
    if gpus == ref.gpus:
        notes.append(f"{gpus} GPU(s), as tuned: global batch {g}, peak LR {peak:.4g}; nothing changes")
    else:
        notes.append(f"global batch {g0} -> {g} (x{k:g}): {batch}/GPU x {gpus} GPU(s) x accum {accum}")
        why = {"linear": f"x{k:g}", "sqrt": f"x sqrt({k:g}) = x{math.sqrt(k):.3g}", "none": "unchanged"}[rule]
        notes.append(f"peak LR {peak0:.4g} -> {peak:.4g} ({rule} rule: {why}); config lr {_sig(lr):.4g} for one GPU's "
                     f"batch with lr_rule {rule}, the trainer scales it over {gpus * accum}")  # fmt: skip
        if warm != ref.warmup_epochs:
            notes.append(
                f"warmup {ref.warmup_epochs:g} -> {warm:g} epochs: the LR ramps from {_sig(lr):.4g} to the peak"
            )
            notes.append(f"epochs {ref.epochs} -> {epochs}: the added warmup comes on top of the tuned schedule")
        elif rule == "none" and k > 1:
            notes.append("LR not scaled: each epoch has fewer, larger steps, so expect slower progress per epoch")
    if steps is not None:
        ref_steps = ref.train_samples // g0
        notes.append(f"{steps} optimizer step(s) per epoch (tuned: {ref_steps}) on {ref.train_samples} samples")
        if steps < 10 and gpus != ref.gpus:
            notes.append("warning: under 10 steps per epoch; consider --keep-global-batch or fewer GPUs")
    return Plan(gpus, batch, accum, _sig(lr), rule, warm, epochs, g, _sig(peak), steps, tuple(notes))
