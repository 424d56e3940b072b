"""Synchronised batch norm: training statistics over every rank's micro-batch, i.e. over the global batch.

On GPUs `sync_batch_norm` converts to Horovod's `hvd.SyncBatchNorm`; that module refuses CPU tensors (and
the `torch.batch_norm_stats` kernels it uses exist for CUDA only), so on the CPU the layers become `CPUSyncBatchNorm`,
which sums per-channel (count, sum, sum of squares) over the ranks with one differentiable allreduce per layer and
forward pass. Conversion is in place and keeps the parameters, buffers and state-dict keys, so checkpoints load into
the plain model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import dist

__all__ = ["CPUSyncBatchNorm", "convert", "count_batch_norms", "sync_batch_norm"]


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm (any dimensionality) whose training statistics span all ranks (on one rank, its own batch: the
    simulated twin, `hvdtrain.fused`, uses it so that both sides compute the statistics the same way).

    Input (N, C, *). Every rank must run the same training forward passes (the loop's equal step counts see to it);
    evaluation with running statistics needs no collective, so uneven evaluation shards are fine.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:  # evaluation with running statistics
            return super().forward(x)
        mean, var, n = self._global_stats(x)
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype) + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y

    @staticmethod
    def _global_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, biased variance, count) per channel over every rank's batch."""
        dims = [0, *range(2, x.dim())]
        # float64 sums: E[x^2] - E[x]^2 cancels badly in float32 when the mean is large against the spread.
        xd = x.to(torch.float64)
        count = xd.new_tensor([x.numel() // x.size(1)])
        # One differentiable allreduce; its backward sums the gradients of the statistics over the ranks.
        stats = dist.allreduce_sum_grad(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
        c, n = x.size(1), stats[-1]
        mean = stats[:c] / n
        return mean, (stats[c : 2 * c] / n - mean * mean).clamp_min(0), n

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp_min(1)  # as nn.BatchNorm: running_var is the unbiased estimate
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def count_batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def _like(bn: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """A `cls` layer that shares `bn`'s parameters and buffers (the optimizer and checkpoints see no change)."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(bn, name))
    return new.train(bn.training)


def convert(model: nn.Module, cls: type[_BatchNorm]) -> int:
    """Replace every BatchNorm inside `model` (in place) by a `cls` layer; returns how many were replaced."""
    done = 0
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, cls):
            setattr(model, name, _like(child, cls))
            done += 1
        else:
            done += convert(child, cls)
    return done


def sync_batch_norm(model: nn.Module, device: torch.device, simulated: bool = False) -> int:
    """Turn `model`'s BatchNorm layers (in place) into synchronised ones; returns how many (0 on one rank: no-op,
    unless `simulated`: simulated GPUs forwarded as one batch, `hvdtrain.fused`, then use `CPUSyncBatchNorm`).

    On GPUs Horovod's `hvd.SyncBatchNorm`; on the CPU, which it refuses, `CPUSyncBatchNorm`.
    """
    if not dist.uses_horovod():
        return convert(model, CPUSyncBatchNorm) if simulated else 0
    return convert(model, dist.horovod_sync_batch_norm() if device.type == "cuda" else CPUSyncBatchNorm)
