"""Training patches that find the nodules, and whole validation volumes.

Nodules fill well under 1% of a chest CT, so uniform crops almost never contain one: a share `fg_share` of
patches is centred on a random foreground voxel (MONAI `RandCropByPosNegLabeld`, nnU-Net
`oversample_foreground_percent`), the rest anywhere. Every draw comes from `numpy.random.default_rng((seed,
epoch, index))`, so a run is reproducible whatever the number of loader workers or ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import DataError
from .preprocess import CachedCase

__all__ = ["Augment", "PatchDataset", "VolumeDataset", "crop_with_pad", "check_patch_fits"]


@dataclass(frozen=True)
class Augment:
    """Training augmentation; `Augment(enabled=False)` turns it off."""

    enabled: bool = True
    flip: bool = True  # random flip of each axis
    rot90: bool = True  # random multiple of 90 degrees in the axial (x, y) plane
    intensity_scale: float = 0.1  # multiply by U(1 - s, 1 + s)
    intensity_shift: float = 0.05  # add U(-s, s) (in normalised units)


def crop_with_pad(volume: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """`volume[start : start + size]` per axis; what lies outside the volume is `pad_value`."""
    out = np.full(tuple(size), pad_value, dtype=volume.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, volume.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def check_patch_fits(cases: Sequence[CachedCase], patch_size: Sequence[int]) -> None:
    """Raise DataError naming the first case whose preprocessed volume is smaller than the patch."""
    for case in cases:
        shape = case.info()["shape"]
        if any(p > s for p, s in zip(patch_size, shape)):
            raise DataError(
                f"patch {tuple(patch_size)} is larger than case {case.case_id} ({case.info()['image_source']}), "
                f"whose preprocessed shape is {tuple(shape)}: use a smaller --patch-size or a finer --target-spacing"
            )


class _CaseArrays:
    """Per-process memory maps and foreground coordinates (not pickled into loader workers)."""

    def __init__(self) -> None:
        self.arrays: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.fg: dict[int, np.ndarray] = {}
        self.minimum: dict[int, float] = {}

    def get(self, i: int, case: CachedCase) -> tuple[np.ndarray, np.ndarray | None]:
        if i not in self.arrays:
            self.arrays[i] = case.arrays(mmap=True)
        return self.arrays[i]

    def foreground(self, i: int, label: np.ndarray | None) -> np.ndarray:
        if i not in self.fg:
            # One pass over the label per process; indices of a few nodules are small.
            self.fg[i] = np.argwhere(np.asarray(label) > 0) if label is not None else np.zeros((0, 3), np.int64)
        return self.fg[i]

    def min_value(self, i: int, image: np.ndarray) -> float:
        if i not in self.minimum:
            self.minimum[i] = float(np.min(image))
        return self.minimum[i]


class PatchDataset(Dataset):
    """Random training patches: `samples_per_volume` per case and epoch.

    Item `i` belongs to case `i // samples_per_volume`. Returns `(image, label)` float32 tensors of shape
    `(1, *patch_size)`. Call `set_epoch(epoch)` each epoch (`hvdtrain.data.set_epoch` does) for fresh patches.

    Args:
        cases: preprocessed cases with labels.
        patch_size: (x, y, z) voxels.
        samples_per_volume: patches per case per epoch.
        fg_share: probability that a patch is centred on a foreground voxel (cases without foreground always
            get a random patch).
        augment: flips, axial 90-degree rotations, intensity scale/shift.
        seed: base seed; patches depend on (seed, epoch, index) only.
        pad_value: image value outside the volume (0 = air after the default min-max window; None: the
            volume's minimum, for z-scored images).
        small_volume: "pad" a volume smaller than the patch, or "error" (DataError naming the case).
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        patch_size: Sequence[int],
        samples_per_volume: int = 2,
        fg_share: float = 0.5,
        augment: Augment = Augment(),
        seed: int = 0,
        pad_value: float | None = 0.0,
        small_volume: str = "pad",
    ):
        if not cases:
            raise DataError("PatchDataset: no training cases")
        if any(c.label is None for c in cases):
            raise DataError(f"PatchDataset: case {next(c.case_id for c in cases if c.label is None)} has no label")
        if not 0.0 <= fg_share <= 1.0:
            raise ValueError(f"fg_share must be in [0, 1], got {fg_share}")
        if small_volume not in ("pad", "error"):
            raise ValueError(f"small_volume must be 'pad' or 'error', got {small_volume!r}")
        if small_volume == "error":
            check_patch_fits(cases, patch_size)
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.fg_share, self.augment, self.seed, self.pad_value = fg_share, augment, seed, pad_value
        self.epoch = 0
        self._cache = _CaseArrays()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = _CaseArrays()  # memory maps are reopened in each worker, not copied through pickle
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_volume

    def _start(self, rng: np.random.Generator, shape: Sequence[int], fg: np.ndarray) -> tuple[list[int], bool]:
        half = [p // 2 for p in self.patch_size]
        if len(fg) and rng.random() < self.fg_share:
            center = fg[rng.integers(len(fg))]
            return [int(c) - h for c, h in zip(center, half)], True
        # Uniform over positions inside the volume; a too-small axis is centred (padded both sides).
        start = [int(rng.integers(0, s - p + 1)) if s >= p else -((p - s) // 2) for s, p in zip(shape, self.patch_size)]
        return start, False

    def _augment(self, rng: np.random.Generator, img: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = self.augment
        if a.flip:
            for axis in range(3):
                if rng.random() < 0.5:
                    img, lab = np.flip(img, axis), np.flip(lab, axis)
        if a.rot90:
            # Quarter turns keep the shape only on a square axial patch; otherwise half turns.
            k = int(rng.integers(4)) if self.patch_size[0] == self.patch_size[1] else 2 * int(rng.integers(2))
            img, lab = np.rot90(img, k, axes=(0, 1)), np.rot90(lab, k, axes=(0, 1))
        if a.intensity_scale or a.intensity_shift:
            scale = 1.0 + rng.uniform(-a.intensity_scale, a.intensity_scale)
            shift = rng.uniform(-a.intensity_shift, a.intensity_shift)
            img = img * np.float32(scale) + np.float32(shift)
        return img, lab

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(image patch, label patch, whether it was centred on foreground) as numpy arrays."""
        ci = index // self.samples_per_volume
        image, label = self._cache.get(ci, self.cases[ci])
        rng = np.random.default_rng((self.seed, self.epoch, index))
        start, centred = self._start(rng, image.shape, self._cache.foreground(ci, label))
        pad = self.pad_value if self.pad_value is not None else self._cache.min_value(ci, image)
        img = crop_with_pad(image, start, self.patch_size, pad)
        lab = crop_with_pad(label, start, self.patch_size, 0)
        if self.augment.enabled:
            img, lab = self._augment(rng, img, lab)
        return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(lab, dtype=np.float32), centred

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab, _ = self.sample(index)
        return torch.from_numpy(img)[None], torch.from_numpy(lab)[None]


class VolumeDataset(Dataset):
    """Whole preprocessed volumes for validation or prediction.

    Item: `(image (1, X, Y, Z) float32, label (1, X, Y, Z) uint8, case_id)`; the label is an empty `(0,)`
    tensor for cases without one. Volumes differ in size: use batch size 1 (default collate gives
    `(1, 1, X, Y, Z)` tensors and a one-element list of ids).
    """

    def __init__(self, cases: Sequence[CachedCase]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        case = self.cases[index]
        img, lab = case.arrays(mmap=True)
        image = torch.from_numpy(np.array(img, dtype=np.float32))[None]
        label = torch.from_numpy(np.array(lab, dtype=np.uint8))[None] if lab is not None else torch.zeros(0)
        return image, label, case.case_id
