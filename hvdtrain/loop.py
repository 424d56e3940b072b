"""One training loop made of short functions: `fit(run, cfg)` = set up, then per epoch train-and-log and
validate-and-checkpoint, then summarise; `evaluate` and `evaluate_best` score a model.

Variation comes from the task's `Run` (hvdtrain.run): a `step_fn(model, batch, device) -> (loss, n)` returning the
local mean loss of a micro-batch, an `eval_fn(model, batch, device, metric)` that updates a metric, a
`make_metric()`, and the loaders.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import batching, checkpoint, dist, fastpath, fused, pooling, resume, seeding, syncbn, watchdog
from .atomic import write_text_atomic
from .config import TrainConfig, to_dict
from .data import set_epoch
from .metrics import Metric
from .optimizers import build_optimizer
from .run import EvalFn, Run, RunPaths, SplitStep, StepFn
from .runlog import RunLog
from .schedule import LRSchedule

__all__ = [
    "TrainState",
    "Preemption",
    "step_flags",
    "train_one_epoch",
    "evaluate",
    "evaluate_best",
    "fit",
    "device_for",
    "autocast_dtype",
]


class Preemption:
    """Turns SIGUSR1/SIGTERM (Slurm's warning signal, a scheduler's kill) into a flag the ranks agree on."""

    def __init__(self, at_step: int = 0):
        self.at_step, self.flag = at_step, False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.flag = True

    def local(self, step: int) -> bool:
        """This rank's view; `step_flags` makes the ranks agree."""
        return self.flag or (self.at_step > 0 and step >= self.at_step)

    @staticmethod
    def restore() -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)


def step_flags(preemption: Preemption | None, step: int, nonfinite: bool | torch.Tensor) -> tuple[bool, bool]:
    """(stop for a preemption, some rank's loss was not finite), the same on every rank.

    One small allreduce per optimizer step carries both, so a NaN on one rank stops every rank together instead of
    leaving the others waiting in the next gradient allreduce.
    """
    local = torch.tensor([float(preemption is not None and preemption.local(step)), float(nonfinite)])
    if dist.uses_horovod():
        local = dist.allreduce(local, name="step_flags")
    return bool(local[0] > 0), bool(local[1] > 0)


@dataclass
class TrainState:
    """What the loop carries between epochs (and what a checkpoint restores)."""

    epoch: int = 0  # the epoch in progress (or next to run)
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of `epoch` already trained (non-zero only after a preemption)
    best_metric: float | None = None
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


def device_for() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it, fp16 on request, fp32 on the CPU (CPU autocast is slower than fp32 here)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def train_one_epoch(
    model: nn.Module,
    loader,
    step_fn: StepFn,
    optimizer,
    schedule: LRSchedule,
    state: TrainState,
    cfg: TrainConfig,
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
    preemption: Preemption | None = None,
) -> dict[str, float]:
    """Train until the loader is exhausted or a preemption is requested; returns local sums and timings."""
    model.train()
    micro = cfg.micro_per_step
    sums = _EpochSums(device, schedule.lr_at(state.step))
    batches, train_micro_batch = _micro_batches(model, loader, step_fn, state, cfg, device, scaler, sums)
    bar = _progress_bar(len(loader), state, cfg)
    preempted = after_epoch = False
    t_data = time.perf_counter()
    for i, batch in enumerate(batches):
        sums.data_s += time.perf_counter() - t_data  # waiting for the loader: the input pipeline's share
        counted = train_micro_batch(batch)
        state.batch_in_epoch += counted
        bar.update(counted)
        if state.batch_in_epoch % micro == 0:
            stop = _optimizer_step(model, optimizer, schedule, scaler, state, cfg, preemption, sums)
            if stop:  # on the epoch's last step: finish the epoch (validation, checkpoint), then stop
                preempted, after_epoch = i + 1 < len(batches), i + 1 == len(batches)
                if preempted:
                    break
        t_data = time.perf_counter()
    bar.close()
    sums.data_s -= getattr(batches, "pass_s", 0.0)  # the statistics pass is compute, not data wait
    return sums.result(preempted, after_epoch)


def _micro_batches(model, loader, step_fn: StepFn, state: TrainState, cfg: TrainConfig, device, scaler, sums):
    """(what to iterate over, `train(item) -> micro-batches it counts for`): the loader's micro-batches, with a
    statistics pass for a pooled loss; or with simulated SyncBN groups of simulated GPUs forwarded as one batch."""
    micro, rank = cfg.micro_per_step, dist.info().rank
    amp_dtype = autocast_dtype(cfg.amp, device)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def reseed(m: int) -> int:
        # This GPU's own dropout stream (rank, or simulated GPU), keyed by its position in the run.
        return seeding.seed_micro_batch(cfg.seed, rank, cfg.simulate_gpus, cfg.accum, state.step, m)

    def train_group(group) -> int:  # the simulated GPUs of one accumulation index as one batch (hvdtrain.fused)
        with autocast():
            loss, n = fused.fused_step(model, group, step_fn, reseed, device)
        sums.add_micro_batch(loss, n, cfg.accum, scaler)
        return cfg.simulate_gpus

    def train_one(batch) -> int:
        m = state.batch_in_epoch % micro
        reseed(m)
        # Simulated GPUs after a rank's first leave the running statistics alone: a real run keeps rank 0's.
        with pooling.running_stats_frozen(model, frozen=m >= cfg.accum), autocast():
            loss, n = step_fn(model, batch, device)
        sums.add_micro_batch(loss, n, micro, scaler)
        return 1

    if _fuses(cfg):
        return fused.Groups(loader, cfg.simulate_gpus, cfg.accum), train_group
    return _with_statistics_pass(loader, micro, model, step_fn, reseed, device, autocast), train_one


def _progress_bar(total: int, state: TrainState, cfg: TrainConfig) -> tqdm:
    return tqdm(
        total=total,
        disable=not (dist.is_main() and cfg.progress and sys.stderr.isatty()),  # no bars in batch-job logs
        desc=f"epoch {state.epoch}",
        leave=False,
        dynamic_ncols=True,
    )


class _EpochSums:
    """A rank's running sums over an epoch; the loss and the non-finite count stay on the device (no sync)."""

    def __init__(self, device: torch.device, lr: float):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.samples, self.comm_s, self.data_s, self.lr = 0, 0.0, 0.0, lr

    def add_micro_batch(self, loss: torch.Tensor, n: int, micro: int, scaler) -> None:
        """Backward of one micro-batch's loss; its mean over the step's micro-batches is the step's loss."""
        self.nonfinite += ~torch.isfinite(loss.detach())  # checked once per step, with the other ranks
        (scaler.scale(loss / micro) if scaler else loss / micro).backward()
        self.loss_sum += loss.detach().double() * n
        self.samples += n

    def result(self, preempted: bool, after_epoch: bool) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum.item(),
            "samples": self.samples,
            "comm_s": self.comm_s,
            "data_s": self.data_s,
            "lr": self.lr,
            "preempted": preempted,
            "preempt_after_epoch": after_epoch,
        }


def _optimizer_step(model, optimizer, schedule, scaler, state, cfg, preemption, sums: _EpochSums) -> bool:
    """Allreduce, then one optimizer step on every rank; returns whether the ranks agreed to stop (preemption)."""
    sums.lr = schedule.apply(optimizer, state.step)
    t0 = time.perf_counter()
    dist.synchronize(optimizer)  # hvd: wait for the allreduce so clipping/unscaling see averaged gradients
    sums.comm_s += time.perf_counter() - t0
    stop, diverged = step_flags(preemption, state.step + 1, sums.nonfinite.item())
    if diverged:  # before the step: the weights and the last checkpoint stay finite
        raise FloatingPointError(
            f"non-finite loss at epoch {state.epoch}, step {state.step}"
            f"{'' if sums.nonfinite.item() else ' on another rank'}: lower the learning rate or check the data"
        )
    if scaler:
        scaler.unscale_(optimizer)
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    with dist.skip_synchronize(optimizer):  # hvd: gradients are already reduced
        scaler.step(optimizer) if scaler else optimizer.step()
    if scaler:
        scaler.update()
    optimizer.zero_grad()  # no set_to_none argument: Horovod's wrapper rejects it (horovod#3405)
    state.step += 1
    watchdog.beat(f"epoch {state.epoch}, optimizer step {state.step + 1} (step {state.step} completed)")
    return stop


class _StatisticsPass:
    """The loader's batches, with a step's statistics pass run on its micro-batches before the first is yielded."""

    def __init__(self, loader, micro: int, prepass: Callable[[list], None]):
        self.loader, self.micro, self.prepass, self.pass_s = loader, micro, prepass, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        group: list = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.micro:  # the sampler hands out whole steps
                t0 = time.perf_counter()
                self.prepass(group)
                self.pass_s += time.perf_counter() - t0
                yield from group
                group = []


def _with_statistics_pass(loader, micro: int, model: nn.Module, step_fn: StepFn, reseed, device, autocast):
    """`loader` itself, or with a statistics pass per step when the loss pools statistics over the global batch
    (`step_fn.global_stats`, see `hvdtrain.pooling`) and a step has several micro-batches."""
    stats = getattr(step_fn, "global_stats", None)
    if stats is None or micro == 1:  # one micro-batch: the loss's own differentiable allreduce is exact
        return loader
    return _StatisticsPass(
        loader, micro, lambda group: pooling.statistics_pass(model, group, step_fn, stats, reseed, device, autocast)
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, eval_fn: EvalFn, metric: Metric, device: torch.device, amp: str = "auto"
) -> dict[str, float]:
    """Update `metric` on this rank's share of the data, then reduce once; every rank gets the same numbers."""
    model.eval()
    metric.reset()
    amp_dtype = autocast_dtype(amp, device)
    for batch in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            eval_fn(model, batch, device, metric)
    result = metric.compute()
    watchdog.beat("the collective after an evaluation (evaluation completed)")
    return result


def evaluate_best(run: Run, cfg: TrainConfig, which: str = "best") -> tuple[dict[str, float], Metric, dict | None]:
    """The run's best (or "last") checkpoint scored on `run.val`, on every rank (a collective).

    Rank 0 reads the checkpoint and broadcasts it. Returns (the metric's values, the metric, the checkpoint), the
    checkpoint None when the run wrote none (the model's current weights are scored then).
    """
    paths = RunPaths(cfg.run_dir)
    path = {"best": paths.best, "last": paths.last}[which]
    ckpt = checkpoint.load_on_all_ranks(path if dist.is_main() and path.is_file() else None)
    if ckpt is not None:
        checkpoint.unwrap(run.model).load_state_dict(ckpt["model"])
    metric = run.make_metric()
    return evaluate(run.model, run.val, run.eval_fn, metric, device_for(), cfg.amp), metric, ckpt


@dataclass(frozen=True)
class _Shape:
    """The run's batch geometry and LR for this GPU count."""

    micro: int  # micro-batches per optimizer step on a rank (accumulation x simulated GPUs)
    gpus: int
    global_batch: int
    peak_lr: float
    steps_per_epoch: int
    scaling: str  # "weak" (per-GPU batch fixed) or "strong" (--global-batch)


def _shape(cfg: TrainConfig, train_loader) -> _Shape:
    d = dist.info()
    micro, gpus = cfg.micro_per_step, d.size * cfg.simulate_gpus
    global_batch = batching.check(cfg, d.size)
    # hvd: LR scaled in GPUs x accumulation (weak scaling); not for a fixed --global-batch, nor for Adasum.
    peak_lr = batching.peak_lr(cfg, gpus)
    steps_per_epoch = len(train_loader) // micro
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch has {len(train_loader)} micro-batches per rank, fewer than the {micro} of one step")
    return _Shape(micro, gpus, global_batch, peak_lr, steps_per_epoch, "weak" if cfg.global_batch is None else "strong")


@dataclass
class _Fit:
    """What `fit` sets up once and every epoch uses."""

    run: Run
    cfg: TrainConfig
    config: dict[str, Any]
    paths: RunPaths
    shape: _Shape
    device: torch.device
    optimizer: Any
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None
    state: TrainState
    log: RunLog
    preemption: Preemption
    grad_bytes: int
    start: float = field(default_factory=time.time)
    epoch_times: list[float] = field(default_factory=list)
    comm_total: float = 0.0
    common: dict[str, Any] = field(default_factory=dict)  # the current epoch's fields of every record
    train_loss: float = math.nan
    last_val: dict[str, float] = field(default_factory=dict)


def fit(run: Run, cfg: TrainConfig, on_epoch_end: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train `run.model` for `cfg.epochs`, validating, checkpointing and logging into `cfg.run_dir` (a collective).

    `on_epoch_end` is called on every rank with each validation record (e.g. to report to Optuna). Returns the
    summary also written to summary.json; `"preempted": True` when the run stopped for a requeue.
    """
    cfg = batching.resolve(cfg, dist.info().size)  # --global-batch: the per-GPU batch and accumulation here
    f = _set_up(run, cfg)
    try:
        while f.state.epoch < cfg.epochs:
            tr = _train_and_log(f)
            if tr["preempted"]:
                return _stop_for_requeue(f)
            ckpt = _validate_and_checkpoint(f, on_epoch_end)
            if tr["preempt_after_epoch"] and f.state.epoch < cfg.epochs:
                return _stop_for_requeue(f, ckpt)
    finally:
        watchdog.stop()
        Preemption.restore()
        f.log.close()
    return _summarise(f)


def _set_up(run: Run, cfg: TrainConfig) -> _Fit:
    """The optimizer and schedule from the config, the restored state (--resume), the run folder, the watchdog."""
    device, shape, paths = device_for(), _shape(cfg, run.train), RunPaths(cfg.run_dir)
    config = dict(run.config or to_dict(cfg))
    if _fuses(cfg):
        _check_fused(run.model, run.step_fn, cfg)
    _sync_batch_norm(run.model, cfg, device)
    fastpath.prepare_model(run.model, device, cfg.channels_last, cfg.cudnn_benchmark)
    base_optimizer = build_optimizer(run.model, cfg.optimizer, shape.peak_lr, cfg.weight_decay, cfg.momentum)
    plateau_mode = _plateau_mode(cfg.plateau_monitor, run.monitor, run.mode)
    schedule = LRSchedule.from_config(cfg, shape.peak_lr, shape.steps_per_epoch, plateau_mode)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype(cfg.amp, device) == torch.float16 else None
    state, ckpt = _restore_or_start(run, cfg, config, paths, schedule, scaler, shape)
    optimizer = dist.distribute_optimizer(base_optimizer, run.model, shape.micro, cfg.fp16_allreduce, cfg.adasum)
    if ckpt is not None:
        # After wrapping: hvd.DistributedOptimizer builds a new optimizer from the param groups and drops the
        # state of the one it wraps (momentum buffers, Adam moments).
        optimizer.load_state_dict(ckpt["optimizer"])
    if not (cfg.resume and state.step):
        dist.broadcast_parameters(run.model)  # hvd: identical starting weights everywhere
    # Bytes allreduced per step: the scaling model's input (communication time against GPU count).
    grad_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    log = _open_run_folder(cfg, config, paths, shape, state, grad_bytes)
    preemption = Preemption(cfg.preempt_at_step)
    f = _Fit(run, cfg, config, paths, shape, device, optimizer, schedule, scaler, state, log, preemption, grad_bytes)
    watchdog.start(cfg.stall_timeout, dist.info().rank, paths.stalled)  # ends this rank if another one hangs
    return f


def _restore_or_start(
    run: Run, cfg: TrainConfig, config: dict, paths: RunPaths, schedule: LRSchedule, scaler, shape: _Shape
) -> tuple[TrainState, dict | None]:
    """(training state, checkpoint or None): the newest checkpoint's with --resume, else a fresh start."""
    state = TrainState()
    if not cfg.resume:
        if dist.is_main() and checkpoint.find_latest(paths.root) is not None:  # never overwrite a run by accident
            raise FileExistsError(
                f"run folder {paths.root} already holds checkpoints: pass --resume to continue it, or choose another "
                "--run-dir"
            )
        return state, None
    path = checkpoint.find_latest(paths.root) if dist.is_main() else None
    ckpt = checkpoint.load_on_all_ranks(path)  # hvd: the resume state reaches every rank from rank 0
    if ckpt is not None:
        resume.check(ckpt, config, run.model, str(path or "rank 0's checkpoint"))  # before any weight is loaded
        _restore(ckpt, run.model, schedule, scaler, state)
        resume.adapt_position(state, ckpt, shape.micro, shape.steps_per_epoch, cfg.batch_size_per_gpu)
        dist.print0(f"resumed from {path} at epoch {state.epoch}, step {state.step}")
    return state, ckpt


def _open_run_folder(
    cfg: TrainConfig, config: dict, paths: RunPaths, shape: _Shape, state: TrainState, grad_bytes: int
) -> RunLog:
    """config.json (with this run's size), metrics.jsonl trimmed to the resumed epoch, and the run's header line."""
    d = dist.info()
    config.update(
        world_size=d.size,
        gpus=shape.gpus,
        global_batch=shape.global_batch,
        scaling=shape.scaling,
        peak_lr=shape.peak_lr,
        grad_bytes=grad_bytes,
    )
    log = RunLog(paths.root)
    log.write_json(paths.config.name, config)
    if dist.is_main():
        _trim_metrics(paths.metrics, state.epoch)
        paths.requeue.unlink(missing_ok=True)
        paths.stalled.unlink(missing_ok=True)  # left by the watchdog of the run this one resumes
    if cfg.lr_table:
        rule = f"--lr-table row for batch {shape.global_batch}, warmup {cfg.warmup_epochs:g} epochs"
    else:
        rule = cfg.lr_rule if shape.scaling == "weak" else "fixed global batch: not scaled"
    dist.print0(
        f"{d.size} rank(s) x {cfg.simulate_gpus} simulated = {shape.gpus} GPU(s); batch {cfg.batch_size_per_gpu}"
        f"/GPU x accum {cfg.accum} = global batch {shape.global_batch} ({shape.scaling} scaling); lr {cfg.lr} -> "
        f"{shape.peak_lr:.4g} ({rule}), {shape.steps_per_epoch} steps/epoch"
    )
    return log


def _train_and_log(f: _Fit) -> dict[str, Any]:
    """One epoch of training, its sums reduced over ranks once and logged; the state moves to the next epoch."""
    t0 = time.perf_counter()
    set_epoch(f.run.train, f.state.epoch, skip_batches=f.state.batch_in_epoch)
    tr = train_one_epoch(
        f.run.model, f.run.train, f.run.step_fn, f.optimizer, f.schedule, f.state, f.cfg, f.device, f.scaler,
        f.preemption,
    )  # fmt: skip
    if tr["preempted"]:
        return tr
    train_time = time.perf_counter() - t0
    sums = [tr["loss_sum"], tr["samples"], tr["comm_s"], tr["data_s"]]
    totals = dist.allreduce(torch.tensor(sums, dtype=torch.float64))
    size = dist.info().size
    samples, comm_s, data_s = int(totals[1]), float(totals[2]) / size, float(totals[3]) / size  # means over ranks
    f.train_loss = float(totals[0]) / max(samples, 1)
    f.common = {
        "epoch": f.state.epoch,
        "elapsed_s": time.time() - f.start,
        "lr": tr["lr"],
        "global_batch": f.shape.global_batch,
        "world_size": size,
        "gpus": f.shape.gpus,
    }
    f.log.log(
        {
            **f.common,
            "split": "train",
            "time_s": train_time,
            "samples": samples,
            "samples_per_s": samples / train_time,
            "loss": f.train_loss,
            "comm_s": comm_s,
            "data_s": data_s,
            "compute_s": train_time - comm_s - data_s,
        }
    )
    f.epoch_times.append(train_time)
    f.comm_total += comm_s
    f.state.epoch, f.state.batch_in_epoch = f.state.epoch + 1, 0
    return tr


def _validate_and_checkpoint(f: _Fit, on_epoch_end: Callable[[dict], None] | None) -> dict[str, Any]:
    """Validate when due, step the schedule's epoch, save last.pt (and best.pt when the monitor improved)."""
    epoch = f.state.epoch - 1  # the epoch just trained
    value = plateau_value = None
    if (epoch + 1) % f.cfg.eval_every == 0 or epoch + 1 == f.cfg.epochs:
        value, plateau_value = _validate(f, on_epoch_end)
    # The reduced value, the same on every rank, so every rank decays the LR at the same epoch.
    f.schedule.epoch_end(plateau_value)
    improved = _is_better(value, f.state.best_metric, f.run.mode)
    if improved:
        f.state.best_metric, f.state.best_epoch = value, epoch
    ckpt = _checkpoint_state(f)
    if dist.is_main():
        checkpoint.save(f.paths.last, ckpt)
        if improved:  # a copy on disk, not a reference to the live model
            checkpoint.save(f.paths.best, ckpt)
    return ckpt


def _validate(f: _Fit, on_epoch_end: Callable[[dict], None] | None) -> tuple[float | None, float | None]:
    """(monitored value, plateau value) of this epoch's validation, logged and passed to `on_epoch_end`."""
    t1 = time.perf_counter()
    dist.broadcast_running_stats(f.run.model)  # hvd: every rank validates the model rank 0 saves
    f.last_val = evaluate(f.run.model, f.run.val, f.run.eval_fn, f.run.make_metric(), f.device, f.cfg.amp)
    val_time = time.perf_counter() - t1
    if f.cfg.plateau_monitor and f.cfg.plateau_monitor not in f.last_val:
        raise ValueError(f"--plateau-monitor {f.cfg.plateau_monitor!r} is not a validation value: {sorted(f.last_val)}")
    record = {**f.common, "split": "val", "time_s": val_time, **f.last_val}
    f.log.log(record)
    if on_epoch_end is not None:
        on_epoch_end(record)
    dist.print0(
        f"epoch {f.common['epoch']}: train loss {f.train_loss:.4f}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in f.last_val.items() if isinstance(v, float))
    )
    return f.last_val.get(f.run.monitor), f.last_val.get(f.cfg.plateau_monitor or f.run.monitor)


def _summarise(f: _Fit) -> dict[str, Any]:
    """The run's summary, written to summary.json (rank 0)."""
    cfg, shape, times = f.cfg, f.shape, f.epoch_times
    epoch_time = sum(times) / len(times) if times else None
    summary = {
        "world_size": dist.info().size,
        "simulate_gpus": cfg.simulate_gpus,
        "gpus": shape.gpus,
        "batch_size_per_gpu": cfg.batch_size_per_gpu,
        "accum": cfg.accum,
        "global_batch": shape.global_batch,
        "scaling": shape.scaling,
        "lr": shape.peak_lr,
        "lr_rule": cfg.lr_rule,
        "epochs": cfg.epochs,
        "total_time_s": time.time() - f.start,
        "epoch_time_s": epoch_time,
        "samples_per_s": shape.steps_per_epoch * shape.global_batch / epoch_time if epoch_time else None,
        "comm_fraction": f.comm_total / sum(times) if times else None,
        "grad_bytes": f.grad_bytes,
        "steps_per_epoch": shape.steps_per_epoch,
        "train_samples": len(f.run.train.dataset) if hasattr(f.run.train, "dataset") else None,
        "monitor": f.run.monitor,
        "best_metric": f.state.best_metric,
        "best_epoch": f.state.best_epoch,
        "final_metric": f.last_val.get(f.run.monitor),
        "final": f.last_val,
        "preempted": False,
    }
    f.log.write_json(f.paths.summary.name, summary)
    return summary


def _checkpoint_state(f: _Fit) -> dict[str, Any]:
    # Every rank's global RNG state, for draws outside the keyed streams. Dropout masks (per GPU) and augmentation
    # (per sample) are re-derived from their position in the run (hvdtrain.seeding): a resume repeats them exactly.
    rngs = dist.allgather_object(checkpoint.rng_state())
    state = f.state
    return {
        "model": checkpoint.unwrap(f.run.model).state_dict(),
        "optimizer": f.optimizer.state_dict(),
        "schedule": f.schedule.state_dict(),
        "scaler": f.scaler.state_dict() if f.scaler else {},
        "epoch": state.epoch,
        "step": state.step,
        "batch_in_epoch": state.batch_in_epoch,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "rng": rngs,
        "config": f.config,
    }


def _restore(ckpt: dict[str, Any], model: nn.Module, schedule: LRSchedule, scaler, state: TrainState) -> None:
    checkpoint.unwrap(model).load_state_dict(ckpt["model"])
    schedule.load_state_dict(ckpt["schedule"])
    if scaler and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.step, state.batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
    state.best_metric, state.best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
    rngs = ckpt["rng"]
    if len(rngs) == dist.info().size:
        checkpoint.set_rng_state(rngs[dist.info().rank])


def _stop_for_requeue(f: _Fit, ckpt: dict | None = None) -> dict[str, Any]:
    """Checkpoint to last.pt and leave a REQUEUE file for the job script; every rank returns."""
    if ckpt is None:
        ckpt = _checkpoint_state(f)
    state = f.state
    if dist.is_main():
        checkpoint.save(f.paths.last, ckpt)
        f.paths.requeue.write_text(f"preempted at epoch {state.epoch}, step {state.step}\n")
    dist.print0(f"preempted: checkpoint at epoch {state.epoch} step {state.step}; REQUEUE written")
    return {"preempted": True, "epoch": state.epoch, "step": state.step}


def _plateau_mode(plateau_monitor: str, monitor: str, mode: str) -> str:
    """The plateau's direction: the checkpoint's `mode` for the same value, 'min' for a loss, else 'max'."""
    if not plateau_monitor or plateau_monitor == monitor:
        return mode
    return "min" if "loss" in plateau_monitor else "max"


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if value is None or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _trim_metrics(path: Path, before_epoch: int) -> None:
    """Drop metrics.jsonl lines of epochs that the resumed run will train again (rank 0)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if _epoch_of(ln) < before_epoch]
        write_text_atomic(path, "".join(ln + "\n" for ln in lines))


def _epoch_of(line: str) -> float:
    """A metrics.jsonl line's epoch; a line cut short by a crash counts as not written (inf: dropped)."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _fuses(cfg: TrainConfig) -> bool:
    """Whether a step's simulated GPUs are forwarded as one batch (hvdtrain.fused): --sync-bn's twin, or asked."""
    return cfg.simulate_gpus > 1 and (cfg.sync_bn or cfg.fuse_simulated)


def _sync_batch_norm(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """--sync-bn: check that it means something here, then convert the BatchNorm layers (no-op on one rank)."""
    if not cfg.sync_bn:
        return
    if syncbn.count_batch_norms(model) == 0:
        raise ValueError("--sync-bn: the model has no BatchNorm layer to synchronise (a U-Net needs --norm batch)")
    n = syncbn.sync_batch_norm(model, device, simulated=cfg.simulate_gpus > 1)
    sim = f", each rank's {cfg.simulate_gpus} simulated GPUs forwarded as one batch" if cfg.simulate_gpus > 1 else ""
    dist.print0(f"SyncBatchNorm: {n} BatchNorm layer(s) synchronised over {dist.info().size} ranks{sim}")


def _check_fused(model: nn.Module, step_fn: StepFn, cfg: TrainConfig) -> None:
    """Simulated GPUs forwarded as one batch: the step must come in halves, and nothing may mix the GPUs' samples."""
    what = "--sync-bn" if cfg.sync_bn else "--fuse-simulated"
    if not isinstance(step_fn, SplitStep):
        raise ValueError(
            f"{what} with --simulate-gpus needs the task's step function as a hvdtrain.SplitStep (prepare, then "
            "finish after the forward), so that the simulated GPUs' micro-batches can be forwarded as one batch"
        )
    if step_fn.global_stats is not None and cfg.accum > 1:
        raise ValueError(
            f"{what} with --simulate-gpus and --accum > 1 cannot pool a global-batch loss (--global-dice): each "
            "accumulation step is forwarded apart; use --accum 1 or a per-sample loss"
        )
    if not cfg.sync_bn and syncbn.count_batch_norms(model):
        raise ValueError(
            "--fuse-simulated: the model has BatchNorm, whose statistics would span the simulated GPUs' batches "
            "(a real run normalises each GPU's own); add --sync-bn for that, or drop --fuse-simulated"
        )
