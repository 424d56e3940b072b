"""Large-batch optimizers (LARS, LAMB) and the optimizer factory.

LARS (You et al. 2017) and LAMB (You et al. 2019) scale each layer's update by a trust ratio ||w|| / ||update||
so that the large global batches of 32-64 GPUs train stably with a scaled learning rate. Biases and norm
parameters (1-D tensors) are excluded from weight decay and from the trust ratio, as in the papers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["LARS", "LAMB", "build_optimizer", "param_groups"]


def _trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    return torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (`trust_coef` x ||w|| / ||g + wd w||)."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coef: float = 0.001,
        adapt: bool = True,
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef, adapt=adapt)
        )

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad.clone()
                if g["adapt"] and p.ndim > 1:
                    d.mul_(g["trust_coef"] * _trust_ratio(p.norm(), d.norm()))
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam moments with decoupled weight decay and a layer-wise trust ratio ||w|| / ||adam update||."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        adapt: bool = True,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=adapt))

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float64)
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                t = st["step"].item()
                st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (st["exp_avg"] / (1 - b1**t)) / ((st["exp_avg_sq"] / (1 - b2**t)).sqrt().add_(g["eps"]))
                if g["weight_decay"]:
                    update.add_(p, alpha=g["weight_decay"])
                ratio = _trust_ratio(p.norm(), update.norm()) if g["adapt"] and p.ndim > 1 else 1.0
                p.add_(update * ratio, alpha=-g["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: decaying biases and norm scales hurts and is not what the recipes do."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9):
    """The named optimizer over `model`'s parameters at learning rate `lr`."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "lamb":
        return LAMB(groups, lr=lr)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd, adamw, lamb or lars")
