"""One training loop made of functions: `train_one_epoch`, `evaluate`, `fit`.

Variation comes from what is passed in: a `step_fn(model, batch, device) -> (loss, n)` returning the local mean
loss of a micro-batch, an `eval_fn(model, batch, device, metric)` that updates a metric, and a `make_metric()`.
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

from . import batching, checkpoint, dist, fastpath, optim, pooling, resume, seeding, syncbn, watchdog
from .atomic import write_text_atomic
from .config import TrainConfig, to_dict
from .data import set_epoch
from .metrics import Metric
from .optimizers import build_optimizer
from .runlog import RunLog
from .schedule import LRSchedule

__all__ = [
    "TrainState",
    "Preemption",
    "step_flags",
    "train_one_epoch",
    "evaluate",
    "fit",
    "device_for",
    "autocast_dtype",
]

StepFn = Callable[[nn.Module, Any, torch.device], tuple[torch.Tensor, int]]
EvalFn = Callable[[nn.Module, Any, torch.device, Metric], None]


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
    micro, rank = cfg.accum * cfg.simulate_gpus, dist.info().rank
    amp_dtype = autocast_dtype(cfg.amp, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # stays on device: no sync per step
    samples, comm_s, lr = 0, 0.0, schedule.lr_at(state.step)
    bar = tqdm(
        total=len(loader),
        disable=not (dist.is_main() and cfg.progress and sys.stderr.isatty()),  # no bars in batch-job logs
        desc=f"epoch {state.epoch}",
        leave=False,
        dynamic_ncols=True,
    )
    preempted = after_epoch = False
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    n_batches = len(loader)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def reseed(m: int) -> int:
        # This GPU's own dropout stream (rank, or simulated GPU), keyed by its position in the run.
        return seeding.seed_micro_batch(cfg.seed, rank, cfg.simulate_gpus, cfg.accum, state.step, m)

    batches = _with_statistics_pass(loader, micro, model, step_fn, reseed, device, autocast)
    data_s, t_data = 0.0, time.perf_counter()
    for i, batch in enumerate(batches):
        data_s += time.perf_counter() - t_data  # waiting for the loader: the input pipeline's share of the step
        m = state.batch_in_epoch % micro
        reseed(m)
        # Simulated GPUs after a rank's first leave the running statistics alone: a real run keeps rank 0's.
        with pooling.running_stats_frozen(model, frozen=m >= cfg.accum), autocast():
            loss, n = step_fn(model, batch, device)
        nonfinite += ~torch.isfinite(loss.detach())  # checked once per step, with the other ranks
        # Each micro-batch's loss is its local mean: divide so the accumulated gradient is the step's mean.
        (scaler.scale(loss / micro) if scaler else loss / micro).backward()
        loss_sum += loss.detach().double() * n
        samples += n
        state.batch_in_epoch += 1
        bar.update(1)
        if state.batch_in_epoch % micro:
            t_data = time.perf_counter()
            continue
        lr = schedule.apply(optimizer, state.step)
        t0 = time.perf_counter()
        optim.synchronize(optimizer)  # hvd: wait for the allreduce so clipping/unscaling see averaged gradients
        comm_s += time.perf_counter() - t0
        stop, diverged = step_flags(preemption, state.step + 1, nonfinite.item())
        if diverged:  # before the step: the weights and the last checkpoint stay finite
            raise FloatingPointError(
                f"non-finite loss at epoch {state.epoch}, step {state.step}"
                f"{'' if nonfinite.item() else ' on another rank'}: lower the learning rate or check the data"
            )
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        with optim.skip_synchronize(optimizer):  # hvd: gradients are already reduced
            scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
        optimizer.zero_grad()  # no set_to_none argument: Horovod's wrapper rejects it (horovod#3405)
        state.step += 1
        watchdog.beat(f"epoch {state.epoch}, optimizer step {state.step + 1} (step {state.step} completed)")
        if stop:
            # On the epoch's last step, finish the epoch (validation, checkpoint) and stop after it instead.
            preempted, after_epoch = i + 1 < n_batches, i + 1 == n_batches
            if preempted:
                break
        t_data = time.perf_counter()
    bar.close()
    return {
        "loss_sum": loss_sum.item(),
        "samples": samples,
        "comm_s": comm_s,
        "data_s": data_s - getattr(batches, "pass_s", 0.0),  # the statistics pass is compute, not data wait
        "lr": lr,
        "preempted": preempted,
        "preempt_after_epoch": after_epoch,
    }


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


def _checkpoint_state(
    model: nn.Module, optimizer, schedule: LRSchedule, scaler, state: TrainState, config: dict[str, Any]
) -> dict[str, Any]:
    # Every rank's global RNG state, for draws outside the keyed streams. Dropout masks (per GPU) and augmentation
    # (per sample) are re-derived from their position in the run (hvdtrain.seeding): a resume repeats them exactly.
    rngs = dist.allgather_object(checkpoint.rng_state())
    return {
        "model": checkpoint.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler else {},
        "epoch": state.epoch,
        "step": state.step,
        "batch_in_epoch": state.batch_in_epoch,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "rng": rngs,
        "config": config,
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


def _stop_for_requeue(
    model, optimizer, schedule, scaler, state: TrainState, config: dict, run_dir: Path, ckpt: dict | None = None
) -> dict[str, Any]:
    """Checkpoint to last.pt and leave a REQUEUE file for the job script; every rank returns."""
    if ckpt is None:
        ckpt = _checkpoint_state(model, optimizer, schedule, scaler, state, config)
    if dist.is_main():
        checkpoint.save(run_dir / "checkpoints" / "last.pt", ckpt)
        (run_dir / "REQUEUE").write_text(f"preempted at epoch {state.epoch}, step {state.step}\n")
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


def _trim_metrics(run_dir: Path, before_epoch: int) -> None:
    """Drop metrics.jsonl lines of epochs that the resumed run will train again (rank 0)."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if _epoch_of(ln) < before_epoch]
        write_text_atomic(path, "".join(ln + "\n" for ln in lines))


def _epoch_of(line: str) -> float:
    """A metrics.jsonl line's epoch; a line cut short by a crash counts as not written (inf: dropped)."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _sync_batch_norm(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """--sync-bn: check that it means something here, then convert the BatchNorm layers (no-op on one rank)."""
    if not cfg.sync_bn:
        return
    if syncbn.count_batch_norms(model) == 0:
        raise ValueError("--sync-bn: the model has no BatchNorm layer to synchronise (a U-Net needs --norm batch)")
    if cfg.simulate_gpus > 1:
        # A real SyncBN step normalises with statistics of all GPUs' batches at once; simulated GPUs run one after
        # another, so each would silently use its own micro-batch's statistics instead.
        raise ValueError(
            "--sync-bn cannot be simulated: --simulate-gpus runs the GPUs' micro-batches one after another, so they "
            "cannot share batch statistics; use real ranks (or one GPU with the batch of all of them)"
        )
    n = optim.sync_batch_norm(model, device)
    dist.print0(f"SyncBatchNorm: {n} BatchNorm layer(s) synchronised over {dist.info().size} ranks")


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    step_fn: StepFn,
    eval_fn: EvalFn,
    make_metric: Callable[[], Metric],
    cfg: TrainConfig,
    config: dict[str, Any] | None = None,
    monitor: str = "dice",
    mode: str = "max",
    on_epoch_end: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train `model` for `cfg.epochs`, validating, checkpointing and logging into `cfg.run_dir`.

    Args:
        config: the job's whole config as a dict (defaults to `cfg`'s); saved in config.json and checkpoints.
        monitor, mode: the validation value that picks the best checkpoint (and drives the plateau schedule).
        on_epoch_end: called on every rank with each validation record (e.g. to report to Optuna).

    Returns:
        The summary also written to summary.json; `"preempted": True` when the run stopped for a requeue.
    """
    d, device = dist.info(), device_for()
    run_dir = Path(cfg.run_dir)
    config = dict(config or to_dict(cfg))
    micro = cfg.accum * cfg.simulate_gpus
    gpus = d.size * cfg.simulate_gpus
    global_batch = batching.check(cfg, d.size)
    # hvd: LR scaled in GPUs x accumulation (weak scaling); not for a fixed --global-batch, nor for Adasum.
    peak_lr = batching.peak_lr(cfg, gpus)
    steps_per_epoch = len(train_loader) // micro
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch has {len(train_loader)} micro-batches per rank, fewer than the {micro} of one step")
    _sync_batch_norm(model, cfg, device)
    fastpath.prepare_model(model, device, cfg.channels_last, cfg.cudnn_benchmark)
    base_optimizer = build_optimizer(model, cfg.optimizer, peak_lr, cfg.weight_decay, cfg.momentum)
    schedule = LRSchedule(
        cfg.schedule,
        cfg.lr,
        peak_lr,
        steps_per_epoch * cfg.epochs,
        round(cfg.warmup_epochs * steps_per_epoch),
        cfg.min_lr_ratio,
        cfg.step_epochs * steps_per_epoch,
        cfg.step_gamma,
        cfg.plateau_patience,
        cfg.poly_power,
        _plateau_mode(cfg.plateau_monitor, monitor, mode),
    )
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype(cfg.amp, device) == torch.float16 else None
    state = TrainState()
    ckpt = None
    if not cfg.resume and dist.is_main() and checkpoint.find_latest(run_dir) is not None:
        # Never overwrite a run's checkpoints by accident.
        raise FileExistsError(
            f"run folder {run_dir} already holds checkpoints: pass --resume to continue it, or choose another --run-dir"
        )
    if cfg.resume:
        path = checkpoint.find_latest(run_dir) if dist.is_main() else None
        ckpt = checkpoint.load_on_all_ranks(path)  # hvd: the resume state reaches every rank from rank 0
        if ckpt is not None:
            resume.check(ckpt, config, model, str(path or "rank 0's checkpoint"))  # before any weight is loaded
            _restore(ckpt, model, schedule, scaler, state)
            resume.adapt_position(state, ckpt, micro, steps_per_epoch, cfg.batch_size_per_gpu)
            dist.print0(f"resumed from {path} at epoch {state.epoch}, step {state.step}")
    optimizer = optim.distribute(base_optimizer, model, micro, cfg.fp16_allreduce, cfg.adasum)
    if cfg.resume and ckpt is not None:
        # After wrapping: hvd.DistributedOptimizer builds a new optimizer from the param groups and drops the
        # state of the one it wraps (momentum buffers, Adam moments).
        optimizer.load_state_dict(ckpt["optimizer"])
    if not (cfg.resume and state.step):
        optim.broadcast_parameters(model)  # hvd: identical starting weights everywhere
    # Bytes allreduced per step: the scaling model's input (communication time against GPU count).
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    scaling = "weak" if cfg.global_batch is None else "strong"
    config.update(
        world_size=d.size, gpus=gpus, global_batch=global_batch, scaling=scaling, peak_lr=peak_lr, grad_bytes=grad_bytes
    )
    log = RunLog(run_dir)
    log.write_json("config.json", config)
    if dist.is_main():
        _trim_metrics(run_dir, state.epoch)
        (run_dir / "REQUEUE").unlink(missing_ok=True)
        (run_dir / "STALLED").unlink(missing_ok=True)  # left by the watchdog of the run this one resumes
    dist.print0(
        f"{d.size} rank(s) x {cfg.simulate_gpus} simulated = {gpus} GPU(s); batch {cfg.batch_size_per_gpu}"
        f"/GPU x accum {cfg.accum} = global batch {global_batch} ({scaling} scaling); lr {cfg.lr} -> {peak_lr:.4g} "
        f"({cfg.lr_rule if scaling == 'weak' else 'fixed global batch: not scaled'}), {steps_per_epoch} steps/epoch"
    )
    preemption = Preemption(cfg.preempt_at_step)
    watchdog.start(cfg.stall_timeout, d.rank, run_dir / "STALLED")  # ends this rank if another one hangs
    ckpt_dir = run_dir / "checkpoints"
    start = time.time()
    epoch_times: list[float] = []
    comm_total = 0.0
    last_val: dict[str, float] = {}
    try:
        while state.epoch < cfg.epochs:
            t0 = time.perf_counter()
            set_epoch(train_loader, state.epoch, skip_batches=state.batch_in_epoch)
            tr = train_one_epoch(
                model, train_loader, step_fn, optimizer, schedule, state, cfg, device, scaler, preemption
            )
            if tr["preempted"]:
                return _stop_for_requeue(model, optimizer, schedule, scaler, state, config, run_dir)
            train_time = time.perf_counter() - t0
            totals = dist.allreduce(
                torch.tensor([tr["loss_sum"], tr["samples"], tr["comm_s"], tr["data_s"]], dtype=torch.float64)
            )
            epoch = state.epoch
            common = {
                "epoch": epoch,
                "elapsed_s": time.time() - start,
                "lr": tr["lr"],
                "global_batch": global_batch,
                "world_size": d.size,
                "gpus": gpus,
            }
            samples = int(totals[1])
            comm_s = float(totals[2]) / d.size
            log.log(
                {
                    **common,
                    "split": "train",
                    "time_s": train_time,
                    "samples": samples,
                    "samples_per_s": samples / train_time,
                    "loss": float(totals[0]) / max(samples, 1),
                    "comm_s": comm_s,
                    "data_s": float(totals[3]) / d.size,  # mean over ranks, like comm_s
                    "compute_s": train_time - comm_s - float(totals[3]) / d.size,
                }
            )
            epoch_times.append(train_time)
            comm_total += comm_s
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            value = plateau_value = None
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                t1 = time.perf_counter()
                optim.broadcast_running_stats(model)  # hvd: every rank validates the model rank 0 saves
                last_val = evaluate(model, val_loader, eval_fn, make_metric(), device, cfg.amp)
                val_time = time.perf_counter() - t1
                value = last_val.get(monitor)
                if cfg.plateau_monitor and cfg.plateau_monitor not in last_val:
                    raise ValueError(
                        f"--plateau-monitor {cfg.plateau_monitor!r} is not a validation value: {sorted(last_val)}"
                    )
                plateau_value = last_val.get(cfg.plateau_monitor or monitor)
                record = {**common, "split": "val", "time_s": val_time, **last_val}
                log.log(record)
                if on_epoch_end is not None:
                    on_epoch_end(record)
                dist.print0(
                    f"epoch {epoch}: train loss {float(totals[0]) / max(samples, 1):.4f}, "
                    + ", ".join(f"{k} {v:.4f}" for k, v in last_val.items() if isinstance(v, float))
                )
            # The reduced value, the same on every rank, so every rank decays the LR at the same epoch.
            schedule.epoch_end(plateau_value)
            improved = _is_better(value, state.best_metric, mode)
            if improved:
                state.best_metric, state.best_epoch = value, epoch
            ckpt = _checkpoint_state(model, optimizer, schedule, scaler, state, config)
            if dist.is_main():
                checkpoint.save(ckpt_dir / "last.pt", ckpt)
                if improved:  # a copy on disk, not a reference to the live model
                    checkpoint.save(ckpt_dir / "best.pt", ckpt)
            if tr["preempt_after_epoch"] and state.epoch < cfg.epochs:
                return _stop_for_requeue(model, optimizer, schedule, scaler, state, config, run_dir, ckpt)
    finally:
        watchdog.stop()
        Preemption.restore()
        log.close()
    total = time.time() - start
    summary = {
        "world_size": d.size,
        "simulate_gpus": cfg.simulate_gpus,
        "gpus": gpus,
        "batch_size_per_gpu": cfg.batch_size_per_gpu,
        "accum": cfg.accum,
        "global_batch": global_batch,
        "scaling": scaling,
        "lr": peak_lr,
        "lr_rule": cfg.lr_rule,
        "epochs": cfg.epochs,
        "total_time_s": total,
        "epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
        "samples_per_s": (steps_per_epoch * global_batch) / (sum(epoch_times) / len(epoch_times))
        if epoch_times
        else None,
        "comm_fraction": comm_total / sum(epoch_times) if epoch_times else None,
        "grad_bytes": grad_bytes,
        "steps_per_epoch": steps_per_epoch,
        "monitor": monitor,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "final_metric": last_val.get(monitor),
        "final": last_val,
        "preempted": False,
    }
    log.write_json("summary.json", summary)
    return summary
