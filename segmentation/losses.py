"""Soft Dice loss (+ optional cross-entropy) and a deep-supervision wrapper. Local: never talks across ranks.

Dice per channel, as MONAI `DiceLoss` and nnU-Net's soft Dice compute it:

    tp = sum(p * g), fp = sum(p * (1 - g)), fn = sum((1 - p) * g)
    dice = (2 tp + smooth_nr) / (2 tp + fp + fn + smooth_dr),  loss = 1 - mean(dice)

summed over the spatial axes (per-sample Dice, `batch_dice=False`, then averaged over samples and channels) or
also over the batch (`batch_dice=True`, one Dice per channel for the whole batch).

Global-batch Dice across ranks: with `batch_dice=True`, the stacked (tp, fp, fn) sums go through `reduce_fn`
before the ratio. The trainer passes a `hvdtrain.pooling.GlobalStats` (a differentiable sum over ranks, and over
a step's micro-batches with accumulation or simulated GPUs), so the loss is the Dice of the global batch and does
not change meaning with the number of GPUs (nnU-Net gathers tp/fp/fn under DDP the same way). Per-sample Dice needs
no reduction: its mean over ranks is what gradient averaging already computes, so `reduce_fn` is not applied then.

Empty ground truth, per-sample: with the default tiny smoothing the loss of a nodule-free patch is ~0 for an
empty prediction and ~1 with vanishing gradient otherwise; batch Dice or the cross-entropy term give such
patches a useful gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiceLoss", "DeepSupervisionLoss", "soft_dice_stats"]

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def soft_dice_stats(probs: torch.Tensor, target: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    """Stacked (tp, fp, fn): shape `(3, C)` with `batch_dice`, else `(3, B, C)`; inputs `(B, C, *spatial)`."""
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0, *axes)
    tp = (probs * target).sum(axes)
    fp = (probs * (1 - target)).sum(axes)
    fn = ((1 - probs) * target).sum(axes)
    return torch.stack([tp, fp, fn])


class DiceLoss(nn.Module):
    """Soft Dice loss on logits, optionally plus `ce_weight` x (binary) cross-entropy.

    Args:
        activation: "sigmoid" (one or more independent foreground channels; target same shape as the logits),
            "softmax" (C classes; target `(B, 1, *spatial)` class indices or one-hot `(B, C, *spatial)`) or
            "none" (inputs are already probabilities; no cross-entropy then).
        batch_dice: sum tp/fp/fn over the batch before the ratio (nnU-Net's 3d_fullres default) instead of one
            Dice per sample.
        smooth_nr, smooth_dr: added to numerator and denominator (MONAI defaults 1e-5).
        ce_weight: weight of the cross-entropy term (BCE-with-logits for sigmoid), 0 for Dice only.
        include_background: with softmax, whether class 0 counts in the Dice (nnU-Net leaves it out).
        reduce_fn: applied to the stacked `(3, C)` tp/fp/fn sums when `batch_dice` is on (identity by default);
            pass `hvdtrain.pooling.GlobalStats()` for a global-batch Dice across ranks and micro-batches.

    Shapes:
        logits `(B, C, X, Y, Z)` float; target `(B, C, X, Y, Z)` (sigmoid, 0/1 or soft) or as above (softmax).
        Returns a scalar.
    """

    def __init__(
        self,
        activation: str = "sigmoid",
        batch_dice: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        ce_weight: float = 0.0,
        include_background: bool = True,
        reduce_fn: ReduceFn | None = None,
    ):
        super().__init__()
        if activation not in ("sigmoid", "softmax", "none"):
            raise ValueError(f"activation must be 'sigmoid', 'softmax' or 'none', got {activation!r}")
        if ce_weight and activation == "none":
            raise ValueError("ce_weight needs logits: use activation 'sigmoid' or 'softmax'")
        self.activation, self.batch_dice = activation, batch_dice
        self.smooth_nr, self.smooth_dr, self.ce_weight = smooth_nr, smooth_dr, ce_weight
        self.include_background = include_background
        self.reduce_fn = reduce_fn or _identity

    def _target(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.activation == "softmax" and target.shape[1] == 1 and logits.shape[1] > 1:
            onehot = F.one_hot(target[:, 0].long(), logits.shape[1])
            return onehot.movedim(-1, 1).to(logits.dtype)
        if target.shape != logits.shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
        return target.to(logits.dtype)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 3:
            raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
        logits = logits.float()  # Dice sums in bf16/fp16 lose the small nodule terms
        onehot = self._target(logits, target)
        if self.activation == "sigmoid":
            probs = torch.sigmoid(logits)
        elif self.activation == "softmax":
            probs = torch.softmax(logits, dim=1)
        else:
            probs = logits
        p, g = probs, onehot
        if self.activation == "softmax" and not self.include_background:
            p, g = p[:, 1:], g[:, 1:]
        stats = soft_dice_stats(p, g, self.batch_dice)
        if self.batch_dice:
            stats = self.reduce_fn(stats)  # hvd: global tp/fp/fn when the trainer passes GlobalStats
        tp, fp, fn = stats[0], stats[1], stats[2]
        dice = (2 * tp + self.smooth_nr) / (2 * tp + fp + fn + self.smooth_dr)
        loss = 1 - dice.mean()
        if self.ce_weight:
            if self.activation == "sigmoid":
                ce = F.binary_cross_entropy_with_logits(logits, onehot)
            else:
                ce = F.cross_entropy(logits, onehot.argmax(1) if target.shape[1] == 1 else onehot)
            loss = loss + self.ce_weight * ce
        return loss


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of `loss` over the outputs `[full, 1/2, 1/4, ...]` of a deep-supervised U-Net.

    The target is downsampled to each output's size with nearest-neighbour (as nnU-Net does); weights halve per
    level and are normalised to sum to 1. A plain tensor output is passed straight to `loss`.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss, self.weights = loss, weights

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        w = list(self.weights) if self.weights is not None else [0.5**k for k in range(len(outputs))]
        if len(w) < len(outputs):
            raise ValueError(f"{len(outputs)} outputs but only {len(w)} deep-supervision weights")
        total = sum(w[: len(outputs)])
        loss = outputs[0].new_zeros(())
        for wk, out in zip(w, outputs):
            t = target if out.shape[2:] == target.shape[2:] else F.interpolate(target.float(), out.shape[2:])
            loss = loss + (wk / total) * self.loss(out, t)
        return loss
