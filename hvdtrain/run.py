"""What a task hands the trainer (`Run`), and the names of a run folder's files (`RunPaths`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .metrics import Metric

__all__ = ["Run", "RunPaths", "SplitStep", "StepFn", "EvalFn"]

StepFn = Callable[[nn.Module, Any, torch.device], tuple[torch.Tensor, int]]
EvalFn = Callable[[nn.Module, Any, torch.device, Metric], None]
# prepare(batch, device) -> (model input, model keyword arguments, finish); finish(model output) -> (loss, samples)
Prepare = Callable[[Any, torch.device], tuple[torch.Tensor, dict[str, Any], Callable[[Any], tuple[torch.Tensor, int]]]]


class SplitStep:
    """A step function in two halves with the forward between them, so the trainer can forward several simulated
    GPUs' micro-batches as one batch (simulated SyncBatchNorm, `hvdtrain.fused`). Called, it is a plain step_fn.

    `global_stats`: the loss's `hvdtrain.pooling.GlobalStats` when it pools sums over the global batch, else None.
    """

    def __init__(self, prepare: Prepare, global_stats: Any = None):
        self.prepare, self.global_stats = prepare, global_stats

    def __call__(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        inputs, kwargs, finish = self.prepare(batch, device)
        return finish(model(inputs, **kwargs))


@dataclass
class Run:
    """One training run of a task: each task's `engine.build_run(cfg, ...)` returns it, `hvdtrain.fit` trains it.

    Attributes:
        model: the network (rank 0's initial weights are broadcast by `fit`).
        train, val: this rank's loaders (`hvdtrain.data.train_loader` / `eval_loader`).
        step_fn: `step_fn(model, batch, device) -> (local mean loss, samples)` of one micro-batch; it may carry a
            `global_stats` (`hvdtrain.pooling.GlobalStats`) when its loss pools sums over the global batch. A
            `SplitStep` (both engines' steps are) also lets --sync-bn be simulated.
        eval_fn: `eval_fn(model, batch, device, metric)` updates a metric made by `make_metric()`.
        config: the job's whole config, saved in config.json and in every checkpoint (default: the TrainConfig).
        monitor, mode: the validation value that picks best.pt, and whether larger ("max") is better.
    """

    model: nn.Module
    train: Any
    val: Any
    step_fn: StepFn
    eval_fn: EvalFn
    make_metric: Callable[[], Metric]
    config: dict[str, Any] | None = None
    monitor: str = "dice"
    mode: str = "max"


class RunPaths:
    """The files of a run folder, written by rank 0 (see docs/CONTRACT.md)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.summary = self.root / "summary.json"
        self.requeue = self.root / "REQUEUE"  # left by a preempted run: the job script requeues itself
        self.stalled = self.root / "STALLED"  # left by the watchdog when a rank hung
