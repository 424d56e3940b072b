"""Test scaffolding: a tiny task on generated data for the toy demo, the tests and the overhead benchmark.

Images of a bright blob on noise; the class is the blob's quadrant. Deterministic from a seed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .metrics import Metric

__all__ = ["make_blobs", "ToyNet", "step_fn", "eval_fn", "ToyMetric"]


def make_blobs(n: int, size: int = 16, seed: int = 0) -> TensorDataset:
    """`n` images (1, size, size) with a Gaussian blob in one of 4 quadrants, labels 0..3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    half = size // 2
    cy = (labels // 2) * half + torch.randint(2, half - 2, (n,), generator=g)
    cx = (labels % 2) * half + torch.randint(2, half - 2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    images = torch.exp(-d2 / 6.0) + 0.8 * torch.randn(n, size, size, generator=g)
    return TensorDataset(images[:, None].float(), labels)


class ToyNet(nn.Module):
    """(B, 1, H, W) -> (B, 4) logits; dropout so the resume test exercises the RNG state."""

    def __init__(self, width: int = 16, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * width, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def step_fn(model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, int]:
    x, y = (t.to(device, non_blocking=True) for t in batch)
    return nn.functional.cross_entropy(model(x), y), len(y)


class ToyMetric(Metric):
    fields = ("loss_sum", "correct", "count")

    def finalize(self, t: dict[str, float]) -> dict[str, float]:
        n = max(t["count"], 1)
        return {"loss": t["loss_sum"] / n, "accuracy": t["correct"] / n, "count": t["count"]}


def eval_fn(model: nn.Module, batch, device: torch.device, metric: Metric) -> None:
    x, y = (t.to(device) for t in batch)
    logits = model(x).float()
    metric.add(
        loss_sum=nn.functional.cross_entropy(logits, y, reduction="sum").item(),
        correct=(logits.argmax(1) == y).sum().item(),
        count=len(y),
    )
