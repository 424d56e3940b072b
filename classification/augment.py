"""Tensor pipelines over cached uint8 images and masks, and batch mixing (mixup / cutmix).

Input of every transform: `(image, mask)`, image (3, S, S) uint8 and mask (1, S, S) uint8 (0/255) as cached by
`classification.cache`. Output: a normalised (3, s, s) float image and a (1, s, s) float mask in [0, 1].

Training: geometry is drawn once and applied to the image and its mask together (rotation, random resized crop,
horizontal flip, optional elastic deformation); intensity changes touch the image only (brightness/contrast, or a
TrivialAugmentWide / RandAugment policy restricted to its photometric operations, and speckle-like
multiplicative noise). No vertical flip: depth runs downwards in ultrasound and posterior shadowing is a cue.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["POLICIES", "PhotometricTrivialAugment", "PhotometricRandAugment", "SpeckleNoise", "EvalPipeline",
           "TrainPipeline", "mix_batch"]  # fmt: skip

POLICIES = ("basic", "trivial", "randaugment")
_GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


class PhotometricTrivialAugment(v2.TrivialAugmentWide):
    """TrivialAugmentWide without its geometric operations (they would move the image but not the mask)."""

    _AUGMENTATION_SPACE = {k: v for k, v in v2.TrivialAugmentWide._AUGMENTATION_SPACE.items() if k not in _GEOMETRIC}


class PhotometricRandAugment(v2.RandAugment):
    """RandAugment without its geometric operations."""

    _AUGMENTATION_SPACE = {k: v for k, v in v2.RandAugment._AUGMENTATION_SPACE.items() if k not in _GEOMETRIC}


class SpeckleNoise(nn.Module):
    """Multiplicative noise `x * (1 + sigma * n)`, n ~ N(0, 1), on a float image in [0, 1], with probability `p`."""

    def __init__(self, sigma: float = 0.1, p: float = 0.5) -> None:
        super().__init__()
        self.sigma, self.p = float(sigma), float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0 or torch.rand(()) >= self.p:
            return x
        noise = torch.randn(x.shape[-2:], dtype=x.dtype) * self.sigma  # one field for all channels (grey image)
        return (x * (1 + noise)).clamp_(0, 1)


def _finish(image: torch.Tensor, mask: torch.Tensor, speckle: nn.Module | None = None):
    x = image.as_subclass(torch.Tensor).float().div_(255)
    if speckle is not None:
        x = speckle(x)
    x = v2.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    return x, mask.as_subclass(torch.Tensor).float().div_(255)


class EvalPipeline:
    """Centre crop `image_size` from the cached S x S image (and mask), normalise. Picklable (loader workers)."""

    def __init__(self, image_size: int) -> None:
        self.crop = v2.CenterCrop(image_size)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, m = self.crop(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return _finish(img, m)


class TrainPipeline:
    """The training augmentation (see the module docstring). Picklable (loader workers).

    Args:
        image_size: output side.
        policy: "basic" (brightness/contrast 0.2), "trivial" (photometric TrivialAugmentWide), "randaugment".
        scale: area range of the random resized crop.
        rotation: maximum rotation in degrees, either way.
        elastic: probability of an elastic deformation (alpha 30, sigma 5 px, at most a tenth of the side).
        speckle: sigma of the multiplicative noise (applied to half of the images; 0: none).
    """

    def __init__(
        self,
        image_size: int,
        policy: str = "basic",
        scale: tuple[float, float] = (0.7, 1.0),
        rotation: float = 10.0,
        elastic: float = 0.0,
        speckle: float = 0.0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {policy!r}; choose from {', '.join(POLICIES)}")
        geometric = [
            v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR) if rotation > 0 else None,
            v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(0.5),
            # sigma capped for small images: the blur kernel (8 sigma + 1) must be narrower than the image.
            v2.RandomApply([v2.ElasticTransform(alpha=30.0, sigma=min(5.0, image_size / 10))], p=elastic)
            if elastic > 0
            else None,
        ]
        self.geometric = v2.Compose([op for op in geometric if op is not None])
        self.photometric = {
            "basic": lambda: v2.ColorJitter(brightness=0.2, contrast=0.2),
            "trivial": PhotometricTrivialAugment,
            "randaugment": lambda: PhotometricRandAugment(num_ops=2, magnitude=9),
        }[policy]()
        self.noise = SpeckleNoise(speckle) if speckle > 0 else None

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, m = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(mask))
        m = (m > 127).to(torch.uint8) * 255  # bilinear/elastic resampling blurs the mask edge: binary again
        return _finish(self.photometric(img), m, self.noise)


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor | None,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mix a batch with a shuffled copy of itself: mixup or cutmix (one of the enabled, chosen at random).

    Args:
        images: (B, C, H, W) float.
        targets: (B, K) class probabilities (one-hot or smoothed).
        masks: (B, 1, H, W) or None; mixed exactly like the images (blend for mixup, pasted box for cutmix).
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameters; 0 disables that method (both 0: no-op).

    Returns:
        (images, targets, masks) mixed; targets weighted by the mixed share of each image.
    """
    methods = [m for m, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not methods or images.shape[0] < 2:
        return images, targets, masks
    method = methods[int(torch.randint(len(methods), (), generator=generator))]
    alpha = mixup_alpha if method == "mixup" else cutmix_alpha
    beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
    lam = float(beta.sample())
    perm = torch.randperm(images.shape[0], generator=generator)
    if method == "mixup":
        mix = lambda x: lam * x + (1 - lam) * x[perm]
    else:
        h, w = images.shape[-2:]
        ch, cw = round(h * (1 - lam) ** 0.5), round(w * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, (), generator=generator)), int(torch.randint(w, (), generator=generator))
        y0, y1, x0, x1 = (
            max(cy - ch // 2, 0),
            min(cy + ch - ch // 2, h),
            max(cx - cw // 2, 0),
            min(cx + cw - cw // 2, w),
        )
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the box may be clipped at the border: the real share

        def mix(x: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            return out

    return mix(images), lam * targets + (1 - lam) * targets[perm], None if masks is None else mix(masks)
