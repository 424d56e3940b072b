"""Image lists for classification: the BUSI folder layout or a CSV manifest, and a torch Dataset over them.

BUSI layout::

    ROOT/<class>/<name>.png            one image (png, jpg, jpeg, bmp, tif, tiff)
    ROOT/<class>/<name>_mask.png       its lesion mask(s), also <name>_mask_1.png, <name>_mask2.png, ...

Class names are the sub-folder names, sorted, so label i is the i-th name. Masks are recognised by name and never
loaded as images (their shapes alone would tell the class apart); files at ROOT itself are ignored.

Bad input policy (the same for folders and manifests):

* a missing root, manifest, listed file or requested class folder: `FileNotFoundError` naming it;
* a class folder with no images, a manifest with no rows, fewer than two classes: `DataError` naming it;
* a mask whose image is missing: `DataError` naming the mask (with `skip_bad=True`: ignored, counted and logged);
* an unreadable image: `ImageReadError` naming the file (with `skip_bad=True`: dropped from the list, counted in
  `ImageIndex.skipped` and logged as a warning). A class left empty by skipping is still an error.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from hvdtrain.seeding import sample_rng

from .errors import DataError, ImageReadError, PixelValueError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageReadError",
    "Sample",
    "ImageIndex",
    "is_mask",
    "mask_stem",
    "load_rgb",
    "scan_folder",
    "read_manifest",
    "load_index",
    "list_images",
    "ImageDataset",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# NAME_mask, NAME_mask_1, NAME_mask2, NAME_Mask-3 (any case): BUSI uses the first two.
_MASK_RE = re.compile(r"^(?P<stem>.+?)_mask(?:[_-]?\d+)?$", re.IGNORECASE)


def check_pixels(img: Image.Image, path: Path) -> None:
    """Raise PixelValueError for an empty image or a NaN/inf pixel (named by its row and column)."""
    if img.width == 0 or img.height == 0:
        raise PixelValueError(f"image {path} has no pixels (size {img.width}x{img.height})")
    if img.mode == "F":  # float TIFFs; the integer modes of PNG and JPEG cannot hold NaN
        a = np.asarray(img, dtype=np.float64)
        bad = ~np.isfinite(a)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            n = int(bad.sum())
            raise PixelValueError(f"image {path} has {n} non-finite pixel(s), the first at row {row} col {col}")


@dataclass(frozen=True)
class Sample:
    """One image and its integer label."""

    path: Path
    label: int


@dataclass
class ImageIndex:
    """The images of a dataset, their labels and what was skipped.

    Attributes:
        samples: images in a deterministic order (class, then file name; manifest order for manifests).
        class_names: label i is `class_names[i]`.
        skipped: `(path, reason)` for every file left out under `skip_bad=True`.
        root: the data folder, or the manifest's folder (paths in saved splits are relative to it).
    """

    samples: list[Sample]
    class_names: list[str]
    root: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def describe(self) -> str:
        """One line for logs: `780 images, 3 classes (benign 437, malignant 210, normal 133), 0 skipped`."""
        per = ", ".join(f"{k} {v}" for k, v in self.class_counts().items())
        return f"{len(self.samples)} images, {len(self.class_names)} classes ({per}), {len(self.skipped)} skipped"


def is_mask(path: str | Path) -> bool:
    """True for mask files (`NAME_mask.png`, `NAME_mask_1.png`, ... any case)."""
    return _MASK_RE.match(Path(path).stem) is not None


def mask_stem(path: str | Path) -> str | None:
    """The image stem a mask belongs to (`benign (3)_mask_1.png` -> `benign (3)`), None for non-masks."""
    m = _MASK_RE.match(Path(path).stem)
    return m.group("stem") if m else None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    # 16-bit / 32-bit / float images: stretch this image's range to 0..255. PIL's convert("RGB") would clip
    # every value above 255 to white instead.
    arr = arr.astype(np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip((arr - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: alpha composited over black (the ultrasound background), wide ints rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image of any size and mode as 8-bit RGB.

    Raises:
        FileNotFoundError: `path` does not exist.
        ImageReadError: PIL cannot decode it (the message names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} does not exist")
    try:
        with Image.open(p) as img:
            img.load()  # decode now: a truncated file fails here, not inside a training step
            check_pixels(img, p)
            return _pil_to_rgb(img)
    except PixelValueError:
        raise  # already names the file (and is a ValueError, which the clause below would wrap)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {p}: {e}") from e


def _check_readable(paths: Sequence[Path], skip_bad: bool, skipped: list[tuple[str, str]]) -> list[Path]:
    good = []
    for p in paths:
        try:
            load_rgb(p)
        except ImageReadError as e:
            if not skip_bad:
                raise
            skipped.append((str(p), str(e)))
            log.warning("skipping unreadable image %s", p)
            continue
        good.append(p)
    return good


def _class_images(folder: Path, skip_bad: bool, skipped: list[tuple[str, str]]) -> list[Path]:
    """The non-mask images of one class folder, sorted; checks that every mask has its image."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    images = [p for p in files if not is_mask(p)]
    stems = {p.stem for p in images}
    for m in files:
        stem = mask_stem(m)
        if stem is not None and stem not in stems:
            msg = f"mask {m} has no image {stem}.<ext> beside it"
            if not skip_bad:
                raise DataError(msg + " (a deleted or renamed image?); pass skip_bad=True to ignore such masks")
            skipped.append((str(m), msg))
            log.warning("ignoring %s", msg)
    return images


def scan_folder(
    root: str | Path, classes: Sequence[str] | None = None, skip_bad: bool = False, verify: bool = True
) -> ImageIndex:
    """Index a `ROOT/<class>/*.png` dataset (BUSI layout); masks are excluded.

    Args:
        root: the data folder; each sub-folder (hidden ones aside) is a class.
        classes: the expected class folders, in label order. Missing ones are an error; other folders are
            ignored. None: every sub-folder, sorted by name.
        skip_bad: drop unreadable images and ignore orphan masks (counted in `skipped`, logged) instead of raising.
        verify: decode every image once now so that bad files are found before training.

    Raises:
        FileNotFoundError: `root` or a requested class folder does not exist.
        DataError: a class folder without images, fewer than two classes, an orphan mask (unless `skip_bad`).
        ImageReadError: an unreadable image (unless `skip_bad`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (expected ROOT/<class>/*.png)")
    if classes is None:
        class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    else:
        class_names = list(classes)
        for name in class_names:
            if not (root / name).is_dir():
                raise FileNotFoundError(f"class folder {root / name} does not exist")
    if len(class_names) < 2:
        raise DataError(f"data folder {root} has {len(class_names)} class folder(s) {class_names}; need at least 2")
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for label, name in enumerate(class_names):
        images = _class_images(root / name, skip_bad, skipped)
        if not images:
            raise DataError(
                f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}; masks do not count)"
            )
        if verify:
            images = _check_readable(images, skip_bad, skipped)
            if not images:
                raise DataError(f"class folder {root / name} has no readable images")
        samples += [Sample(p, label) for p in images]
    if skipped:
        log.warning("%s: skipped %d file(s)", root, len(skipped))
    return ImageIndex(samples, class_names, root, skipped)


def read_manifest(
    csv_path: str | Path, classes: Sequence[str] | None = None, skip_bad: bool = False, verify: bool = True
) -> ImageIndex:
    """Index a CSV manifest with a header and columns `path,label` (label = class name).

    Relative paths are taken from the manifest's folder. Classes are the sorted distinct labels unless `classes`
    gives them (then a label outside it is an error). Same errors and `skip_bad` policy as `scan_folder`; a row
    that names a mask file is an error.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"manifest {csv_path} does not exist")
    base = csv_path.parent
    rows: list[tuple[Path, str]] = []
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= {c.strip() for c in reader.fieldnames}:
            raise DataError(f"manifest {csv_path} needs a header with columns path,label; found {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row["path"] or not row["label"]:
                raise DataError(f"manifest {csv_path} line {i}: empty path or label")
            p = Path(row["path"])
            p = p if p.is_absolute() else base / p
            if is_mask(p):
                raise DataError(f"manifest {csv_path} line {i} lists the mask {p}; list images only")
            if not p.is_file():
                raise FileNotFoundError(f"manifest {csv_path} line {i}: image {p} does not exist")
            rows.append((p, row["label"]))
    if not rows:
        raise DataError(f"manifest {csv_path} has no rows")
    class_names = list(classes) if classes is not None else sorted({lab for _, lab in rows})
    unknown = sorted({lab for _, lab in rows} - set(class_names))
    if unknown:
        raise DataError(f"manifest {csv_path} has labels {unknown} outside the classes {class_names}")
    if len(class_names) < 2:
        raise DataError(f"manifest {csv_path} has {len(class_names)} class(es); need at least 2")
    skipped: list[tuple[str, str]] = []
    paths = [p for p, _ in rows]
    good = set(_check_readable(paths, skip_bad, skipped)) if verify else set(paths)
    lookup = {name: i for i, name in enumerate(class_names)}
    samples = [Sample(p, lookup[lab]) for p, lab in rows if p in good]
    counts = np.bincount([s.label for s in samples], minlength=len(class_names))
    for name, c in zip(class_names, counts):
        if c == 0:
            raise DataError(f"manifest {csv_path} has no (readable) images of class {name!r}")
    return ImageIndex(samples, class_names, base, skipped)


def load_index(
    data: str | Path, classes: Sequence[str] | None = None, skip_bad: bool = False, verify: bool = True
) -> ImageIndex:
    """`scan_folder` for a folder, `read_manifest` for a `.csv` file."""
    p = Path(data)
    if p.suffix.lower() == ".csv":
        return read_manifest(p, classes, skip_bad, verify)
    return scan_folder(p, classes, skip_bad, verify)


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their images (recursively, sorted, masks left out)."""
    out: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not is_mask(p))
        elif item.is_file():
            out.append(item)
        else:
            raise FileNotFoundError(f"image {item} does not exist")
    return out


class ImageDataset(Dataset):
    """`(image, label, index)` for each sample; `index` is the position in `samples`.

    The index lets evaluation metrics check that every image is counted exactly once across ranks.

    Args:
        samples: the images, e.g. `[index.samples[i] for i in fold.val]`.
        transform: PIL RGB image -> tensor (see `classification.transforms`).
        seed: for a random transform: its draws come from (seed, epoch, i) (`hvdtrain.seeding.sample_rng`), so they
            differ between ranks and do not depend on the loader's process or the GPU count. None: torch's RNG as is.
    """

    def __init__(
        self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any], seed: int | None = None
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        s = self.samples[i]
        with sample_rng(self.seed, self.epoch, i):
            return self.transform(load_rgb(s.path)), s.label, i

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)
