"""The pieces `hvdtrain.fit` takes for a classifier: datasets of a fold, loss, step_fn, eval_fn, metric factory.

Batches are `(images, labels, indices)` as made by `classification.data.ImageDataset`; the indices let the metric
count each validation image exactly once across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hvdtrain import data, fit, to_dict

from .checkpoint import inference_config, load_pretrained
from .config import ClassifierConfig, monitor_mode
from .data import ImageDataset, ImageIndex
from .metrics import ClassificationMetric
from .models import build_model
from .splits import Fold
from .transforms import eval_transform, train_transform

__all__ = [
    "class_weights",
    "make_loss",
    "make_step_fn",
    "eval_fn",
    "metric_factory",
    "fold_datasets",
    "subset_dataset",
    "FoldRun",
    "fold_run",
]


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights `N / (C * count_c)` (1 for balanced classes; 0 for a class with no images)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def make_loss(
    train_labels: Sequence[int] | np.ndarray,
    num_classes: int,
    label_smoothing: float = 0.0,
    class_weighted: bool = False,
) -> nn.CrossEntropyLoss:
    """Cross-entropy, optionally with label smoothing and class weights from the *training* labels of the fold.

    A local loss (the mean over this rank's micro-batch): it never talks across ranks.
    """
    weight = class_weights(train_labels, num_classes) if class_weighted else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def make_step_fn(loss_fn: nn.Module) -> Callable[[nn.Module, Any, torch.device], tuple[torch.Tensor, int]]:
    """`step_fn(model, batch, device) -> (local mean loss, batch size)` for `hvdtrain.fit`."""

    def step_fn(model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        loss_fn.to(device)  # moves the class-weight buffer once; a no-op afterwards
        logits = model(images)
        return loss_fn(logits.float(), labels), int(labels.shape[0])

    return step_fn


def eval_fn(model: nn.Module, batch: Any, device: torch.device, metric: ClassificationMetric) -> None:
    """Forward one evaluation batch and record it in `metric` (local only; `compute()` reduces)."""
    images, labels, indices = batch
    logits = model(images.to(device, non_blocking=True))
    metric.update(logits, labels, indices)


def metric_factory(class_names: Sequence[str], num_samples: int) -> Callable[[], ClassificationMetric]:
    """`make_metric` for `hvdtrain.fit`: a fresh metric over a validation set of `num_samples` images."""
    return lambda: ClassificationMetric(class_names, num_samples)


def subset_dataset(
    index: ImageIndex,
    indices: Sequence[int],
    image_size: int = 224,
    resize_size: int | None = None,
    augment: bool = False,
) -> ImageDataset:
    """A dataset of `index.samples[i] for i in indices`, with the training or evaluation transform."""
    tf = train_transform(image_size) if augment else eval_transform(image_size, resize_size)
    return ImageDataset([index.samples[i] for i in indices], tf)


def fold_datasets(
    index: ImageIndex, fold: Fold, image_size: int = 224, resize_size: int | None = None, augment: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """(train with augmentation, val with the eval transform) for one fold; the split comes before augmenting."""
    return (
        subset_dataset(index, fold.train, image_size, resize_size, augment),
        subset_dataset(index, fold.val, image_size, resize_size, False),
    )


@dataclass
class FoldRun:
    """One fold's model, loaders, metric and loss, built the same way for `jobs.train_classifier` and `jobs.tune`."""

    cfg: ClassifierConfig
    model: nn.Module
    train: Any  # DataLoader
    val: Any  # DataLoader
    make_metric: Callable[[], ClassificationMetric]
    loss: nn.Module
    config: dict[str, Any]

    def fit(self, on_epoch_end: Callable[[dict], None] | None = None) -> dict[str, Any]:
        """`hvdtrain.fit` on this fold (a collective); its summary plus `train_samples`."""
        summary = fit(
            self.model,
            self.train,
            self.val,
            make_step_fn(self.loss),
            eval_fn,
            self.make_metric,
            self.cfg,
            self.config,
            monitor=self.cfg.monitor,
            mode=monitor_mode(self.cfg.monitor),
            on_epoch_end=on_epoch_end,
        )
        return {**summary, "train_samples": len(self.train.dataset)}


def fold_run(
    cfg: ClassifierConfig, index: ImageIndex, fold: Fold, extra_config: dict[str, Any] | None = None
) -> FoldRun:
    """Build a fold's run from `cfg` (its `run_dir` and `seed` are the fold's); the model is seeded by `cfg.seed`."""
    names = index.class_names
    train_ds, val_ds = fold_datasets(index, fold, cfg.image_size, cfg.resize_size or None, cfg.augment)
    micro = cfg.accum * cfg.simulate_gpus
    train = data.train_loader(train_ds, cfg.batch_size_per_gpu, cfg.seed, cfg.num_workers, micro_per_step=micro)
    val = data.eval_loader(val_ds, cfg.eval_batch_size, cfg.num_workers)
    torch.manual_seed(cfg.seed)  # the same initial weights for the same seed (trials compare fairly)
    model = build_model(cfg.model, len(names), cfg.dropout)
    if cfg.weights:
        load_pretrained(model, cfg.model, cfg.weights)
    loss = make_loss(index.labels[fold.train], len(names), cfg.label_smoothing, cfg.class_weighted)
    config = {
        **to_dict(cfg),
        **inference_config(cfg.model, names, cfg.dropout, cfg.image_size, cfg.resize_size),
        **(extra_config or {}),
    }
    return FoldRun(cfg, model, train, val, metric_factory(names, len(val_ds)), loss, config)
