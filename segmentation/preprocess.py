"""CT preprocessing: canonical orientation, resampling to a target spacing, HU window and normalisation.

`preprocess_dataset` runs it once per dataset and stores `.npy` arrays that loaders open with
`np.load(mmap_mode="r")`, so epochs never decode NIfTI again. A cache entry's file names carry a hash of the
preprocessing parameters and of the source files' size and modification time: changing either makes a new
entry instead of reusing a stale one. `invert_to_original` undoes the geometry for predicted masks.

Array axes are (x, y, z) in RAS+ canonical order after preprocessing (z = slices for axial CT).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as orient
from skimage.transform import resize

from hvdtrain.atomic import save_npy_atomic, write_text_atomic

from .io import Case, load_pair
from .validate import check_volume

__all__ = [
    "PreprocessParams",
    "CachedCase",
    "spacing_of",
    "to_canonical",
    "from_canonical",
    "target_shape",
    "resample",
    "normalize",
    "air_value",
    "preprocess_arrays",
    "preprocess_dataset",
    "invert_to_original",
]

CACHE_VERSION = 1  # bump when the preprocessing code changes what it writes


@dataclass(frozen=True)
class PreprocessParams:
    """What preprocessing does; stored as `config["preprocess"]` in checkpoints so prediction repeats it."""

    target_spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mm (x, y, z) in RAS order; <= 0 keeps an axis
    window: tuple[float, float] = (-1000.0, 400.0)  # HU clip range
    normalize: str = "minmax"  # "minmax": window -> [0, 1]; "zscore": clipped volume to mean 0, std 1

    def __post_init__(self) -> None:
        if self.normalize not in ("minmax", "zscore"):
            raise ValueError(f"normalize must be 'minmax' or 'zscore', got {self.normalize!r}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {self.window}")
        if len(self.target_spacing) != 3:
            raise ValueError(f"target_spacing must have 3 values (x, y, z), got {self.target_spacing}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessParams:
        return cls(
            target_spacing=tuple(float(v) for v in d.get("target_spacing", (0.0, 0.0, 0.0))),
            window=tuple(float(v) for v in d.get("window", (-1000.0, 400.0))),
            normalize=str(d.get("normalize", "minmax")),
        )

    def key(self) -> str:
        """Short hash of the parameters (and the cache format version)."""
        blob = json.dumps({"v": CACHE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis: the lengths of the affine's columns."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip axes to the closest RAS+ orientation (`nibabel.as_closest_canonical`); returns (array, affine)."""
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asanyarray(canon.dataobj), canon.affine


def from_canonical(data: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Inverse of `to_canonical` for an array on the canonical grid: back to the original axis order and signs."""
    to_ras = orient.io_orientation(original_affine)
    back = orient.ornt_transform(orient.axcodes2ornt(("R", "A", "S")), to_ras)
    return orient.apply_orientation(data, back)


def target_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Grid size after resampling (an axis with target <= 0 keeps its size)."""
    return tuple(int(n) if t <= 0 else max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def resample(data: np.ndarray, shape: Sequence[int], is_label: bool) -> np.ndarray:
    """Resize to `shape` with scikit-image: linear for images, nearest for labels (never anti-aliased)."""
    shape = tuple(int(n) for n in shape)
    if tuple(data.shape) == shape:
        return data
    if is_label:
        out = resize(data, shape, order=0, mode="edge", preserve_range=True, anti_aliasing=False)
        return out.astype(np.uint8)
    # Smooth before downsampling (aliasing makes noise grainier); never when upsampling.
    downsampling = any(n < m for n, m in zip(shape, data.shape))
    out = resize(data.astype(np.float32), shape, order=1, mode="edge", preserve_range=True, anti_aliasing=downsampling)
    return out.astype(np.float32)


def normalize(data: np.ndarray, window: Sequence[float], mode: str = "minmax") -> np.ndarray:
    """Clip to the HU window, then scale to [0, 1] ("minmax") or to mean 0 / std 1 ("zscore")."""
    lo, hi = float(window[0]), float(window[1])
    x = np.clip(data.astype(np.float32), lo, hi)
    if mode == "minmax":
        return (x - lo) / (hi - lo)
    if mode == "zscore":
        return (x - x.mean()) / max(float(x.std()), 1e-6)
    raise ValueError(f"normalize must be 'minmax' or 'zscore', got {mode!r}")


def air_value(normalize_mode: str, image: np.ndarray | None = None) -> float | None:
    """The image value of air, used to pad outside a volume: 0 after min-max; after z-score each volume's minimum
    (None when no image is given: the caller takes each volume's own)."""
    if normalize_mode == "minmax":
        return 0.0
    return None if image is None else float(image.min())


def preprocess_arrays(
    image: np.ndarray, affine: np.ndarray, label: np.ndarray | None, params: PreprocessParams
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Preprocess one volume (and its label) held in memory.

    Returns:
        (image float32 on the target grid, label uint8 or None, geometry dict with the original shape and
        affine, the canonical shape and spacing, and the preprocessed shape and spacing).
    """
    canon_img, canon_affine = to_canonical(image, affine)
    spacing = spacing_of(canon_affine)
    shape = target_shape(canon_img.shape, spacing, params.target_spacing)
    out_spacing = tuple(s if t <= 0 else t for s, t in zip(spacing, params.target_spacing))
    out_img = normalize(resample(canon_img, shape, is_label=False), params.window, params.normalize)
    out_lab = None
    if label is not None:
        canon_lab, _ = to_canonical(label, affine)
        out_lab = resample(canon_lab, shape, is_label=True)
    geometry = {
        "original_shape": list(image.shape[:3]),
        "original_affine": np.asarray(affine).tolist(),
        "canonical_shape": list(canon_img.shape[:3]),
        "canonical_spacing": list(spacing),
        "shape": list(shape),
        "spacing": list(out_spacing),
    }
    return np.ascontiguousarray(out_img, dtype=np.float32), out_lab, geometry


def invert_to_original(prob: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """A probability map on the preprocessed grid back to the original image grid (linear, then reoriented).

    Interpolating probabilities and thresholding afterwards gives smoother masks than nearest-neighbour on a
    thresholded mask.
    """
    canon = resample(prob.astype(np.float32), geometry["canonical_shape"], is_label=False)
    return from_canonical(canon, np.asarray(geometry["original_affine"]))


@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case on disk: `.npy` arrays plus a JSON of its geometry and source."""

    case_id: str
    image: Path
    label: Path | None
    meta: Path

    def arrays(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(image float32, label uint8 or None); memory-mapped read-only by default."""
        mode = "r" if mmap else None
        img = np.load(self.image, mmap_mode=mode)
        lab = np.load(self.label, mmap_mode=mode) if self.label is not None else None
        return img, lab

    def info(self) -> dict[str, Any]:
        return json.loads(self.meta.read_text())


def _stamp(paths: Sequence[Path | None]) -> str:
    """Hash of the sources' absolute paths, sizes and modification times."""
    parts = []
    for p in paths:
        if p is not None:
            # A DICOM series is a folder: stamp its files (a slice replaced in place leaves the folder's mtime).
            for f in sorted(Path(p).iterdir()) if Path(p).is_dir() else [Path(p)]:
                st = os.stat(f)
                parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]


def _entry(case: Case, folder: Path) -> CachedCase:
    stem = f"{case.case_id}.{_stamp([case.image, case.label])}"
    label = folder / f"{stem}.label.npy" if case.label is not None else None
    return CachedCase(case.case_id, folder / f"{stem}.image.npy", label, folder / f"{stem}.json")


def _is_complete(entry: CachedCase) -> bool:
    return entry.meta.is_file() and entry.image.is_file() and (entry.label is None or entry.label.is_file())


def preprocess_dataset(
    cases: Sequence[Case],
    cache_dir: str | Path,
    params: PreprocessParams,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
) -> list[CachedCase]:
    """Preprocess `cases` into `cache_dir/pp-<params hash>/` unless already there; returns every case's entry.

    Args:
        cases: from `segmentation.io.list_cases`.
        cache_dir: where preprocessed arrays live (created if missing).
        params: preprocessing parameters (their hash names the sub-folder).
        shard: (rank, size): this process writes only cases rank, rank + size, ... (so ranks share the work);
            call it on every rank, then barrier, before reading the others' entries.
        progress: print one line per case written.

    Returns:
        Entries in the order of `cases`, complete on disk for this shard's cases.
    """
    folder = Path(cache_dir) / f"pp-{params.key()}"
    folder.mkdir(parents=True, exist_ok=True)
    params_file = folder / "params.json"
    if not params_file.is_file():
        write_text_atomic(params_file, json.dumps({"version": CACHE_VERSION, **params.to_dict()}, indent=2) + "\n")
    rank, size = shard
    entries = []
    for i, case in enumerate(cases):
        entry = _entry(case, folder)
        entries.append(entry)
        if i % size != rank or _is_complete(entry):
            continue
        nifti, data, label = load_pair(case)
        check_volume(data, nifti.affine, case.image)  # no NaN voxel or broken geometry enters the cache
        img, lab, geometry = preprocess_arrays(data, nifti.affine, label, params)
        save_npy_atomic(entry.image, img)
        if lab is not None:
            save_npy_atomic(entry.label, lab)
        meta = {
            "case_id": case.case_id,
            "image_source": str(case.image),
            "label_source": str(case.label) if case.label else None,
            "foreground_voxels": int(lab.sum()) if lab is not None else None,
            **geometry,
            "params": params.to_dict(),
        }
        write_text_atomic(entry.meta, json.dumps(meta, indent=1) + "\n")  # written last: marks the entry complete
        if progress:
            print(f"preprocessed {case.case_id}: {geometry['original_shape']} -> {geometry['shape']}", flush=True)
    return entries
