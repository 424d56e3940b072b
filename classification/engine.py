"""The pieces `hvdtrain.fit` takes for a classifier: datasets of a fold, loss, step_fn, eval_fn, metric factory.

Batches are `(images, labels, indices)` as made by `classification.data.ImageDataset`; the indices let the metric
count each validation image exactly once across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from hvdtrain import Run, SplitStep, batching, data, dist, seeding, to_dict

from .augment import EvalPipeline, TrainPipeline, mix_batch
from .cache import CachedDataset, ImageCache, prepare_cache
from .checkpoint import inference_config, load_pretrained
from .config import ClassifierConfig, monitor_mode
from .data import ImageDataset, ImageIndex
from .metrics import ClassificationMetric
from .models import build_model, wrap_classifier
from .splits import Fold
from .transforms import default_resize, eval_transform, train_transform

__all__ = [
    "class_weights",
    "make_loss",
    "make_step_fn",
    "mask_loss",
    "tta_logits",
    "eval_fn",
    "tta_eval_fn",
    "run_cache",
    "recipe_config",
    "metric_factory",
    "fold_datasets",
    "subset_dataset",
    "build_run",
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


def mask_loss(mask_logits: torch.Tensor, masks: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """BCE + soft Dice (over the whole local batch, so empty masks of normal images are fine); local only."""
    mask_logits, masks = mask_logits.float(), masks.float()
    bce = nn.functional.binary_cross_entropy_with_logits(mask_logits, masks)
    p = torch.sigmoid(mask_logits)
    dice = 1 - (2 * (p * masks).sum() + eps) / (p.sum() + masks.sum() + eps)
    return bce + dice


def make_step_fn(
    loss_fn: nn.Module, num_classes: int = 0, mixup: float = 0.0, cutmix: float = 0.0, mask_weight: float = 0.0
) -> SplitStep:
    """`step_fn(model, batch, device) -> (local mean loss, batch size)` for `hvdtrain.fit`, in two halves.

    With `mixup`/`cutmix` the batch is mixed (`classification.augment.mix_batch`) and the loss takes soft targets;
    with `mask_weight > 0` the batch's 4th element (masks) supervises the model's segmentation head.
    """
    if (mixup or cutmix) and num_classes < 2:
        raise ValueError("mixup/cutmix need num_classes")

    def prepare(batch: Any, device: torch.device):
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        masks = batch[3].to(device, non_blocking=True) if mask_weight > 0 else None
        loss_fn.to(device)  # moves the class-weight buffer once; a no-op afterwards
        targets: torch.Tensor = labels
        if mixup or cutmix:
            onehot = nn.functional.one_hot(labels, num_classes).float()
            images, targets, masks = mix_batch(images, onehot, masks, mixup, cutmix)
        n = int(labels.shape[0])
        if masks is None:
            return images, {}, lambda logits: (loss_fn(logits.float(), targets), n)

        def finish(out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
            logits, mask_logits = out
            return loss_fn(logits.float(), targets) + mask_weight * mask_loss(mask_logits, masks), n

        return images, {"with_mask": True}, finish

    return SplitStep(prepare)


def tta_logits(model: nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits, or with `tta` the log of the mean softmax over the image and its left-right flip."""
    logits = model(images)
    if not tta:
        return logits
    probs = (torch.softmax(logits.float(), 1) + torch.softmax(model(images.flip(-1)).float(), 1)) / 2
    return probs.clamp_min(1e-12).log()


def eval_fn(model: nn.Module, batch: Any, device: torch.device, metric: ClassificationMetric) -> None:
    """Forward one evaluation batch and record it in `metric` (local only; `compute()` reduces)."""
    metric.update(model(batch[0].to(device, non_blocking=True)), batch[1], batch[2])


def tta_eval_fn(model: nn.Module, batch: Any, device: torch.device, metric: ClassificationMetric) -> None:
    """`eval_fn` with flip test-time augmentation."""
    metric.update(tta_logits(model, batch[0].to(device, non_blocking=True), True), batch[1], batch[2])


def metric_factory(class_names: Sequence[str], num_samples: int) -> Callable[[], ClassificationMetric]:
    """`make_metric` for `hvdtrain.fit`: a fresh metric over a validation set of `num_samples` images."""
    return lambda: ClassificationMetric(class_names, num_samples)


def subset_dataset(
    index: ImageIndex,
    indices: Sequence[int],
    image_size: int = 224,
    resize_size: int | None = None,
    augment: bool = False,
    cache: ImageCache | None = None,
    cfg: ClassifierConfig | None = None,
) -> ImageDataset | CachedDataset:
    """A dataset of `index.samples[i] for i in indices`, with the training or evaluation transform.

    With `cache` (built over all of `index.samples`), images come from it and `cfg` picks the augmentation.
    Augmentation draws come from (`cfg.seed`, epoch, sample) (`hvdtrain.seeding.sample_rng`): independent per rank.
    """
    seed = (cfg.seed if cfg is not None else 0) if augment else None
    if cache is not None:
        if not augment:
            pipe: Any = EvalPipeline(image_size)
        elif cfg is None:
            pipe = TrainPipeline(image_size)
        else:
            pipe = TrainPipeline(image_size, cfg.aug_policy, elastic=cfg.elastic, speckle=cfg.speckle)
        return CachedDataset(cache, indices, index.labels[list(indices)], pipe, seed)
    tf = train_transform(image_size) if augment else eval_transform(image_size, resize_size)
    return ImageDataset([index.samples[i] for i in indices], tf, seed)


def fold_datasets(
    index: ImageIndex,
    fold: Fold,
    image_size: int = 224,
    resize_size: int | None = None,
    augment: bool = True,
    cache: ImageCache | None = None,
    cfg: ClassifierConfig | None = None,
) -> tuple[Dataset, Dataset]:
    """(train with augmentation, val with the eval transform) for one fold; the split comes before augmenting."""
    return (
        subset_dataset(index, fold.train, image_size, resize_size, augment, cache, cfg),
        subset_dataset(index, fold.val, image_size, resize_size, False, cache, cfg),
    )


def run_cache(cfg: ClassifierConfig, index: ImageIndex, run_dir: str | Path | None = None) -> ImageCache | None:
    """The run's image cache (a collective), None without `--cache`; folder `cfg.cache_dir` or RUN_DIR/data_cache."""
    if not cfg.cache:
        return None
    folder = Path(cfg.cache_dir) if cfg.cache_dir else Path(run_dir or cfg.run_dir) / "data_cache"
    return prepare_cache(index.samples, folder, cfg.resize_size or default_resize(cfg.image_size))


def build_run(
    cfg: ClassifierConfig,
    index: ImageIndex,
    fold: Fold,
    extra_config: dict[str, Any] | None = None,
    cache: ImageCache | None = None,
) -> Run:
    """A fold's run for `hvdtrain.fit` (its `run_dir` and `seed` are the fold's), shared by `classification.crossval`
    and `jobs.tune`; the model is seeded by `cfg.seed`. Every rank builds it.

    `cache`: the run's image cache (`run_cache`); with `cfg.cache` and none given, one is prepared in the fold's run
    folder (or `cfg.cache_dir`).
    """
    cfg = batching.resolve(cfg, dist.info().size)  # --global-batch: per-GPU batch and accumulation for this size
    names = index.class_names
    if cfg.cache and cache is None:
        cache = run_cache(cfg, index)
    if cfg.mask_weight > 0 and cache is None:
        raise ValueError("--mask-weight needs --cache (the masks come from the image cache)")
    train_ds, val_ds = fold_datasets(index, fold, cfg.image_size, cfg.resize_size or None, cfg.augment, cache, cfg)
    train = data.train_loader_for(train_ds, cfg)
    val = data.eval_loader(val_ds, cfg.eval_batch_size, cfg.num_workers)
    seeding.seed_init(cfg.seed)  # the same initial weights on every rank (trials compare fairly); training reseeds
    net = build_model(cfg.model, len(names), cfg.dropout)
    if cfg.weights:
        load_pretrained(net, cfg.model, cfg.weights)
    model = wrap_classifier(net, cfg.mask_weight > 0, cfg.ema_decay)
    loss = make_loss(index.labels[fold.train], len(names), cfg.label_smoothing, cfg.class_weighted)
    config = {
        **to_dict(cfg),
        **inference_config(cfg.model, names, cfg.dropout, cfg.image_size, cfg.resize_size),
        **recipe_config(cfg),
        **(extra_config or {}),
    }
    step = make_step_fn(loss, len(names), cfg.mixup, cfg.cutmix, cfg.mask_weight)
    evaluate_step = tta_eval_fn if cfg.tta else eval_fn
    metric = metric_factory(names, len(val_ds))
    return Run(model, train, val, step, evaluate_step, metric, config, cfg.monitor, monitor_mode(cfg.monitor))


def recipe_config(cfg: ClassifierConfig) -> dict[str, Any]:
    """The checkpoint keys `load_for_inference` needs to rebuild the wrapped model and its preprocessing."""
    return {
        "resize_mode": "square" if cfg.cache else "short_side",
        "mask_head": cfg.mask_weight > 0,
        "ema_decay": cfg.ema_decay,
        "tta": cfg.tta,
    }
