"""Decode and resize every image (and its lesion mask) once per run into a memory-mapped uint8 cache.

Layout of the cache folder (normally `RUN_DIR/data_cache`)::

    images.npy   (N, S, S, 3) uint8   each image resized to S x S (aspect ratio not kept: the whole field of view)
    masks.npy    (N, S, S)    uint8   union of the image's masks `NAME_mask*.png`, 0 or 255 (zeros when none)
    stamp.json   the stamp of the sources: side, format version, and (path, size, mtime_ns) of every image and mask

Rank 0 builds it when the stamp differs (a source file changed, was added or removed, or the side changed) and the
other ranks wait for it and open the same files read-only (`np.load(mmap_mode="r")`, shared through the page
cache). Arrays are written to temporary files and moved into place with `os.replace`; the stamp is written last,
so an interrupted build is rebuilt next time. Training then only crops, flips and jitters small uint8 arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hvdtrain import dist
from hvdtrain.atomic import save_npy_atomic, write_text_atomic
from hvdtrain.seeding import sample_rng

from .data import DataError, ImageReadError, Sample, load_rgb, mask_stem

__all__ = ["CACHE_VERSION", "ImageCache", "mask_paths", "square_uint8", "read_mask", "source_stamp", "build_cache",
           "prepare_cache", "CachedDataset"]  # fmt: skip

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def square_uint8(img: Image.Image, side: int) -> np.ndarray:
    """An RGB PIL image resized (antialiased) to (side, side, 3) uint8: the one resize of the cached pipeline."""
    return np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR, reducing_gap=None))


def mask_paths(image: Path, folder_files: Sequence[Path] | None = None) -> list[Path]:
    """The mask files beside `image` (`NAME_mask.png`, `NAME_mask_1.png`, ...), sorted."""
    files = folder_files if folder_files is not None else [p for p in image.parent.iterdir() if p.is_file()]
    return sorted(p for p in files if mask_stem(p) == image.stem)


def read_mask(paths: Sequence[Path], side: int) -> np.ndarray:
    """Union of the masks as (side, side) uint8 0/255 (zeros when there are none)."""
    out = np.zeros((side, side), dtype=np.uint8)
    for p in paths:
        try:
            with Image.open(p) as m:
                m = m.convert("L").resize((side, side), Image.Resampling.BILINEAR)
        except OSError as e:
            raise ImageReadError(f"cannot read mask {p}: {e}") from e
        out = np.maximum(out, np.where(np.asarray(m) >= 128, 255, 0).astype(np.uint8))
    return out


def _sources(samples: Sequence[Sample]) -> list[tuple[Path, list[Path]]]:
    listing: dict[Path, list[Path]] = {}
    out = []
    for s in samples:
        folder = s.path.parent
        if folder not in listing:
            listing[folder] = [p for p in folder.iterdir() if p.is_file()]
        out.append((s.path, mask_paths(s.path, listing[folder])))
    return out


def source_stamp(samples: Sequence[Sample], side: int) -> str:
    """A hash of the cache's inputs: side, version, and every image's and mask's path, size and mtime."""
    h = hashlib.sha256(f"v{CACHE_VERSION} side={side} n={len(samples)}".encode())
    for image, masks in _sources(samples):
        for p in (image, *masks):
            st = p.stat()
            h.update(f"\n{p}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


class ImageCache:
    """Read-only view of a built cache; the memmaps are opened lazily, so loader workers open their own."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.folder / "images.npy", mmap_mode="r")
        return self._images

    @property
    def masks(self) -> np.ndarray:
        if self._masks is None:
            self._masks = np.load(self.folder / "masks.npy", mmap_mode="r")
        return self._masks

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_images": None, "_masks": None}  # workers reopen the memmaps


def _read_stamp(folder: Path) -> str | None:
    try:
        return json.loads((folder / "stamp.json").read_text())["stamp"]
    except (OSError, ValueError, KeyError):
        return None


def build_cache(samples: Sequence[Sample], folder: str | Path, side: int) -> ImageCache:
    """Decode, resize and store every image and mask (single process; `prepare_cache` is the collective).

    Raises:
        ImageReadError: an image or mask that cannot be decoded (the message names the file).
        DataError: `side` below 8.
    """
    if side < 8:
        raise DataError(f"cache side must be at least 8 pixels, got {side}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = source_stamp(samples, side)
    images = np.empty((len(samples), side, side, 3), dtype=np.uint8)
    masks = np.empty((len(samples), side, side), dtype=np.uint8)
    n_masked = 0
    for i, (image, mask_files) in enumerate(_sources(samples)):
        images[i] = square_uint8(load_rgb(image), side)  # load_rgb names a truncated or unreadable file
        masks[i] = read_mask(mask_files, side)
        n_masked += bool(mask_files)
    (folder / "stamp.json").unlink(missing_ok=True)  # invalid until both arrays are in place
    save_npy_atomic(folder / "images.npy", images)
    save_npy_atomic(folder / "masks.npy", masks)
    stamp_json = {"stamp": stamp, "side": side, "images": len(samples), "with_masks": n_masked}
    write_text_atomic(folder / "stamp.json", json.dumps(stamp_json))  # last: marks the cache complete
    log.info("cache %s: %d images at %d px, %d with masks", folder, len(samples), side, n_masked)
    return ImageCache(folder)


def prepare_cache(samples: Sequence[Sample], folder: str | Path, side: int) -> ImageCache:
    """The cache for `samples` at `side` px, rebuilt by rank 0 only when its stamp is stale (a collective).

    Every rank raises the same error when rank 0 cannot build it (no rank waits forever).
    """
    folder = Path(folder)

    def build() -> str:
        if _read_stamp(folder) == source_stamp(samples, side):
            return "reused"
        build_cache(samples, folder, side)
        return "built"

    outcome = dist.on_main_then_broadcast(build, (OSError, DataError))  # the others wait until the files are in place
    dist.print0(f"image cache {folder}: {outcome} ({len(samples)} images, {side} px)")
    return ImageCache(folder)


class CachedDataset(Dataset):
    """`(image, label, index, mask)` from the cache: `index` is the position in `indices` (for exactly-once eval).

    Args:
        cache: the run's `ImageCache` (all images of the index, in index order).
        indices: which cached images (positions in the index), e.g. a fold's training list.
        labels: their labels, aligned with `indices`.
        pipeline: `(uint8 image (3, S, S), uint8 mask (1, S, S)) -> (float image, float mask)`
            (`classification.augment.train_pipeline` / `eval_pipeline`).
        seed: for a random pipeline: its draws come from (seed, epoch, i), as in `ImageDataset`.
    """

    def __init__(
        self,
        cache: ImageCache,
        indices: Sequence[int],
        labels: Sequence[int],
        pipeline,
        seed: int | None = None,
    ) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        self.cache, self.indices, self.pipeline = cache, [int(i) for i in indices], pipeline
        self._labels = np.asarray(labels, dtype=np.int64)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        j = self.indices[i]
        image = torch.from_numpy(np.array(self.cache.images[j])).permute(2, 0, 1)
        mask = torch.from_numpy(np.array(self.cache.masks[j]))[None]
        with sample_rng(self.seed, self.epoch, i):
            x, m = self.pipeline(image, mask)
        return x, int(self._labels[i]), i, m

    @property
    def labels(self) -> np.ndarray:
        return self._labels
