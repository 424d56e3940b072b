"""The classifier job's config: `hvdtrain.TrainConfig` plus data, model, split and loss fields.

Presets: `jobs/configs/classifier_study.yaml` (the study's recipe), `classifier_default.yaml` (stronger default),
`classifier_demo.yaml` (synthetic data on the CPU in minutes).
"""

from __future__ import annotations

from dataclasses import dataclass

from hvdtrain.config import TrainConfig, arg

from .augment import POLICIES
from .models import MODEL_NAMES

__all__ = ["ClassifierConfig", "MONITORS", "monitor_mode"]

MONITORS = ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro", "loss")


def monitor_mode(monitor: str) -> str:
    """'min' for the loss, 'max' for the scores."""
    return "min" if monitor == "loss" else "max"


@dataclass(frozen=True)
class ClassifierConfig(TrainConfig):
    """Cross-validated image classification (BUSI layout or CSV manifest) under Horovod."""

    run_dir: str = arg("runs/classifier", "run folder: splits.json, fold_<k>/ runs, summary.md")
    epochs: int = arg(30, "training epochs per fold")
    batch_size_per_gpu: int = arg(16, "images per rank per micro-batch")
    data: str = arg("", "data folder ROOT/<class>/*.png (masks *_mask*.png ignored) or a CSV manifest path,label")
    classes: tuple[str, ...] = arg((), "expected class folders in label order (default: all sub-folders, sorted)")
    skip_bad: bool = arg(False, "skip unreadable images and orphan masks (counted, logged) instead of failing")
    model: str = arg("mobilenet_v2", "network", MODEL_NAMES)
    weights: str = arg("", "local torchvision weights file for the backbone (nothing is downloaded)")
    dropout: float = arg(0.5, "dropout before the linear head")
    image_size: int = arg(224, "crop side fed to the network")
    resize_size: int = arg(0, "evaluation resize before the centre crop (0: image_size * 256 / 224)")
    augment: bool = arg(True, "training augmentation (crop, flip, rotation, brightness/contrast)")
    folds: int = arg(5, "cross-validation folds")
    fold: int = arg(-1, "train only this fold (-1: all folds in turn)")
    split_seed: int = arg(0, "seed of the test split and the folds (kept apart from --seed)")
    test_fraction: float = arg(0.0, "hold out this share as a grouped stratified test split (0: none)")
    dedup_threshold: int = arg(6, "pHash bits for near-duplicate groups (-1: no grouping)")
    label_smoothing: float = arg(0.0, "cross-entropy label smoothing")
    class_weighted: bool = arg(False, "weight the loss by inverse class frequency of the fold's training set")
    eval_batch_size: int = arg(32, "images per rank per evaluation batch")
    monitor: str = arg("balanced_accuracy", "validation value that picks the best checkpoint", MONITORS)
    cache: bool = arg(True, "decode + resize every image once into a uint8 memmap (square, resize_size px)")
    cache_dir: str = arg("", "folder of that cache (default RUN_DIR/data_cache)")
    aug_policy: str = arg("basic", "photometric augmentation with --cache", POLICIES)
    elastic: float = arg(0.0, "probability of an elastic deformation (with --cache)")
    speckle: float = arg(0.0, "sigma of speckle-like multiplicative noise on half the images (with --cache)")
    mixup: float = arg(0.0, "mixup Beta(alpha, alpha) parameter (0: off)")
    cutmix: float = arg(0.0, "cutmix Beta(alpha, alpha) parameter (0: off); with mixup one of the two per batch")
    ema_decay: float = arg(0.0, "EMA of the weights, evaluated and checkpointed (0: off; e.g. 0.998)")
    tta: bool = arg(False, "test-time augmentation: mean of the softmax over the image and its left-right flip")
    mask_weight: float = arg(0.0, "weight of the lesion-mask Dice+BCE term of a segmentation head (0: no head)")
