"""Learning-rate scaling rules, warmup and the per-step schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["scale_lr", "LRSchedule"]


def scale_lr(base_lr: float, rule: str, n: float) -> float:
    """The learning rate for `n` times the base batch: linear (Goyal et al. 2017), sqrt (Krizhevsky 2014) or none.

    The one LR rule table of the suite (the trainer's --lr-rule and `tuning.transfer`'s carry-over); `n` may be
    below 1 when a recipe is carried to a smaller global batch.
    """
    if not n > 0:
        raise ValueError(f"the scaling factor must be > 0, got {n}")
    if rule == "linear":
        return base_lr * n
    if rule == "sqrt":
        return base_lr * math.sqrt(n)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr rule {rule!r}; expected none, linear or sqrt")


class LRSchedule:
    """Per-optimizer-step learning rate: warmup from the base LR to the peak, then the chosen decay.

    Warmup ramps linearly from `base_lr` to `peak_lr` (Goyal et al.'s gradual warmup, as in Horovod's ImageNet
    example), so it changes nothing on one GPU where the two are equal. The plateau schedule multiplies the
    LR by `gamma` after `patience` epochs without improvement of a monitored value; that value must be the
    globally reduced one so every rank takes the same decision.
    """

    def __init__(
        self,
        kind: str,
        base_lr: float,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        step_every: int = 0,
        gamma: float = 0.1,
        patience: int = 5,
        power: float = 0.9,
        mode: str = "min",
    ):
        if kind not in ("cosine", "step", "plateau", "poly", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind, self.base_lr, self.peak_lr = kind, base_lr, peak_lr
        self.total_steps, self.warmup_steps = max(1, total_steps), max(0, warmup_steps)
        self.min_lr_ratio, self.step_every, self.gamma = min_lr_ratio, step_every, gamma
        self.patience, self.power, self.mode = patience, power, mode
        # Plateau state: part of the checkpoint.
        self.factor, self.best, self.bad_epochs = 1.0, None, 0

    @classmethod
    def from_config(cls, cfg: Any, peak_lr: float, steps_per_epoch: int, plateau_mode: str) -> LRSchedule:
        """The trainer's schedule: `cfg`'s (a TrainConfig's) epochs converted to optimizer steps."""
        return cls(
            cfg.schedule,
            base_lr=cfg.lr,
            peak_lr=peak_lr,
            total_steps=steps_per_epoch * cfg.epochs,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            min_lr_ratio=cfg.min_lr_ratio,
            step_every=cfg.step_epochs * steps_per_epoch,
            gamma=cfg.step_gamma,
            patience=cfg.plateau_patience,
            power=cfg.poly_power,
            mode=plateau_mode,
        )

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr + (self.peak_lr - self.base_lr) * step / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        floor = self.min_lr_ratio * self.peak_lr
        if self.kind == "cosine":
            return floor + (self.peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "poly":
            return floor + (self.peak_lr - floor) * (1 - t) ** self.power
        if self.kind == "step":
            return self.peak_lr * self.gamma ** ((step - self.warmup_steps) // max(1, self.step_every))
        return self.peak_lr * self.factor  # constant, plateau

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def epoch_end(self, value: float | None) -> None:
        """Feed the plateau schedule the epoch's monitored value (a no-op for the other kinds)."""
        if self.kind != "plateau" or value is None or math.isnan(value):
            return
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.factor *= self.gamma
                self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"factor": self.factor, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.factor, self.best, self.bad_epochs = state["factor"], state["best"], state["bad_epochs"]
