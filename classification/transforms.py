"""Image transforms: the study's evaluation pipeline and an ultrasound-friendly training augmentation.

Eval: resize the short side to `resize_size` (256), centre-crop `image_size` (224), ImageNet normalisation.
Train: random resized crop (70-100 % of the area), horizontal flip, rotation within +-10 degrees, brightness and
contrast jitter. No vertical flip: depth runs downwards in ultrasound and posterior shadowing/enhancement (below a
lesion) is a diagnostic cue. Augmentation is applied per sample inside the dataset, i.e. after splitting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "default_resize", "eval_transform", "train_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


def default_resize(image_size: int) -> int:
    """The resize before the centre crop, in the study's 256:224 ratio (64 -> 73, 224 -> 256)."""
    return round(image_size * 256 / 224)


def _check(image_size: int, resize_size: int) -> None:
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be at least image_size ({image_size})")


def _to_normalised_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(image_size: int = 224, resize_size: int | None = None) -> Transform:
    """PIL RGB -> normalised (3, image_size, image_size) float tensor, deterministic."""
    resize_size = resize_size or default_resize(image_size)
    _check(image_size, resize_size)
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size), *_to_normalised_tensor()])


def train_transform(
    image_size: int = 224,
    scale: tuple[float, float] = (0.7, 1.0),
    rotation: float = 10.0,
    brightness: float = 0.2,
    contrast: float = 0.2,
    hflip: float = 0.5,
) -> Transform:
    """PIL RGB -> augmented, normalised (3, image_size, image_size) float tensor (uses torch's global RNG).

    Args:
        image_size: output side.
        scale: area range of the random resized crop.
        rotation: maximum rotation in degrees (either way); corners are filled with black, like the background.
        brightness, contrast: jitter strengths (factors drawn from [1 - s, 1 + s]).
        hflip: probability of a left-right flip (breast ultrasound has no preferred side).
    """
    _check(image_size, image_size)
    ops: list = [
        v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR) if rotation > 0 else None,
        v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(hflip) if hflip > 0 else None,
        v2.ColorJitter(brightness=brightness, contrast=contrast) if brightness or contrast else None,
        *_to_normalised_tensor(),
    ]
    return v2.Compose([op for op in ops if op is not None])
