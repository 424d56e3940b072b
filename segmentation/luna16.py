"""LUNA16 to the Decathlon NIfTI layout: MetaImage reading, world/voxel conversion and spherical masks.

LUNA16 ships `subsetN/<seriesuid>.mhd` + `.raw` (MetaImage, ITK's LPS world frame) and `annotations.csv`
(`seriesuid, coordX, coordY, coordZ, diameter_mm`, nodule centres in world millimetres). For an index
`ijk = (i, j, k)` along the file's (x, y, z) axes, ITK's geometry is

    world = origin + D @ (spacing * ijk),     ijk = (D^-1 @ (world - origin)) / spacing

where D is the direction matrix whose column `a` is the direction of image axis `a`. MetaImage stores
`TransformMatrix` as those axis directions one after the other, so `D = reshape(TransformMatrix, 3, 3).T`
(ITK `MetaImageIO` sets direction `a` from entries `3a .. 3a+2`). NIfTI affines are RAS, so the written affine is
`diag(-1, -1, 1) @ [D * spacing | origin]`, and the voxel array is stored in (x, y, z) order. Reading and writing
go through SimpleITK (segmentation.formats).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .formats import itk_geometry, read_itk, write_itk
from .io import DataError

__all__ = [
    "MetaImage",
    "read_mhd",
    "write_mhd",
    "world_to_voxel",
    "voxel_to_world",
    "lps_to_ras_affine",
    "sphere_mask",
    "read_annotations",
    "convert_luna16",
]

_ELEMENT_TYPES = {
    "MET_CHAR": np.int8,
    "MET_UCHAR": np.uint8,
    "MET_SHORT": np.int16,
    "MET_USHORT": np.uint16,
    "MET_INT": np.int32,
    "MET_UINT": np.uint32,
    "MET_LONG": np.int64,
    "MET_ULONG": np.uint64,
    "MET_FLOAT": np.float32,
    "MET_DOUBLE": np.float64,
}


@dataclass
class MetaImage:
    """A 3-D MetaImage: voxels indexed `array[i, j, k]` along the file's x, y, z axes, and its geometry."""

    array: np.ndarray  # (x, y, z) order (the file's fastest axis first)
    origin: np.ndarray  # world position of voxel (0, 0, 0), mm (LPS for ITK/DICOM data)
    spacing: np.ndarray  # mm per voxel along x, y, z
    direction: np.ndarray  # 3x3, column a = direction of image axis a

    def index_to_world(self) -> np.ndarray:
        """4x4 matrix taking homogeneous (i, j, k, 1) to world (LPS) millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction * self.spacing[None, :]
        m[:3, 3] = self.origin
        return m


def read_mhd(path: str | Path) -> MetaImage:
    """Read a 3-D `.mhd` (+ `.raw`/`.zraw`) or `.mha` MetaImage with SimpleITK, keeping its LPS geometry.

    Raises:
        FileNotFoundError: no such header.
        ImageReadError (a DataError): a missing or short data file, a corrupt header, not 3-D.
    """
    array, affine = read_itk(path)
    origin, spacing, direction = itk_geometry(affine, path)
    return MetaImage(array, np.array(origin), np.array(spacing), np.array(direction).reshape(3, 3))


def write_mhd(path: str | Path, image: MetaImage, element_type: str = "MET_SHORT") -> Path:
    """Write `image` as `path` (.mhd) + `path.with_suffix('.raw')` with SimpleITK (tests and round trips)."""
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.index_to_world()
    return write_itk(image.array.astype(_ELEMENT_TYPES[element_type]), ras, path, compress=False)


def world_to_voxel(world: np.ndarray, origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """World mm `(..., 3)` to continuous voxel indices (i, j, k) along the image's x, y, z axes."""
    rel = np.asarray(world, dtype=float) - np.asarray(origin, dtype=float)
    return np.linalg.solve(np.asarray(direction, float), rel.T).T / np.asarray(spacing, dtype=float)


def voxel_to_world(ijk: np.ndarray, origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Continuous voxel indices `(..., 3)` to world mm: `origin + D @ (spacing * ijk)`."""
    scaled = np.asarray(ijk, dtype=float) * np.asarray(spacing, dtype=float)
    return np.asarray(origin, dtype=float) + scaled @ np.asarray(direction, dtype=float).T


def lps_to_ras_affine(image: MetaImage) -> np.ndarray:
    """The NIfTI (RAS) affine of an ITK (LPS) image: negate the world x and y rows."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.index_to_world()


def sphere_mask(
    shape: tuple[int, int, int],
    center_world: np.ndarray,
    diameter_mm: float,
    origin: np.ndarray,
    spacing: np.ndarray,
    direction: np.ndarray,
) -> np.ndarray:
    """Boolean mask of the voxels whose centres lie within `diameter_mm / 2` of `center_world` (world mm).

    Distances are measured in world millimetres through the full index-to-world matrix, so anisotropic spacing
    and oblique directions are handled; only the bounding box of the sphere is evaluated.
    """
    radius = diameter_mm / 2
    c = world_to_voxel(center_world, origin, spacing, direction)
    m = np.asarray(direction, float) * np.asarray(spacing, float)[None, :]
    # Half-width in voxels along each axis: radius / smallest world step of that axis (a safe bound).
    half = np.ceil(radius / np.linalg.norm(m, axis=0) * np.sqrt(3)) + 1
    lo = np.maximum(np.floor(c - half), 0).astype(int)
    hi = np.minimum(np.ceil(c + half) + 1, shape).astype(int)
    mask = np.zeros(shape, dtype=bool)
    if np.any(hi <= lo):
        return mask
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    offs = np.stack([g - ci for g, ci in zip(grids, c)], axis=-1)
    dist2 = ((offs @ m.T) ** 2).sum(-1)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = dist2 <= radius**2
    return mask


def read_annotations(path: str | Path) -> dict[str, list[tuple[np.ndarray, float]]]:
    """`annotations.csv` -> {seriesuid: [(world centre xyz, diameter_mm), ...]}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotations file {path} does not exist")
    out: dict[str, list[tuple[np.ndarray, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"}
        if not need <= set(reader.fieldnames or []):
            raise DataError(f"{path}: expected columns {sorted(need)}, found {reader.fieldnames}")
        for row in reader:
            xyz = np.array([float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])])
            out[row["seriesuid"]].append((xyz, float(row["diameter_mm"])))
    return dict(out)


def convert_luna16(
    root: str | Path,
    out: str | Path,
    annotations: str | Path | None = None,
    subsets: list[int] | None = None,
    skip_empty: bool = False,
    limit: int = 0,
    progress: bool = True,
) -> Path:
    """Write LUNA16 scans as `out/imagesTr/<uid>.nii.gz` (int16 HU) + `labelsTr/` (nodule spheres) + dataset.json.

    Args:
        root: folder holding `subsetN/` folders (or `.mhd` files directly) and, by default, `annotations.csv`.
        out: Decathlon dataset folder to write.
        annotations: the CSV (default `root/annotations.csv`).
        subsets: only these subset numbers (default: every `subset*` folder, or `root` itself).
        skip_empty: leave out scans without annotated nodules (they are kept, with empty masks, by default).
        limit: convert at most this many scans (0: all).

    Returns:
        The dataset.json path.
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"LUNA16 folder {root} does not exist")
    notes = read_annotations(annotations or root / "annotations.csv")
    folders = sorted(p for p in root.glob("subset*") if p.is_dir())
    if subsets is not None:
        folders = [p for p in folders if p.name.removeprefix("subset").isdigit() and int(p.name[6:]) in subsets]
    scans = sorted(m for d in (folders or [root]) for m in d.glob("*.mhd") if not m.name.startswith("._"))
    if skip_empty:
        scans = [m for m in scans if m.stem in notes]
    if limit:
        scans = scans[:limit]
    if not scans:
        raise DataError(f"no .mhd scans found under {root}" + (f" in subsets {subsets}" if subsets else ""))
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for n, mhd in enumerate(scans):
        image = read_mhd(mhd)
        label = np.zeros(image.array.shape, dtype=bool)
        for centre, diameter in notes.get(mhd.stem, []):
            label |= sphere_mask(image.array.shape, centre, diameter, image.origin, image.spacing, image.direction)
        affine = lps_to_ras_affine(image)
        hu = np.clip(image.array, -1024, 3071).astype(np.int16)
        for arr, sub in ((hu, "imagesTr"), (label.astype(np.uint8), "labelsTr")):
            nii = nib.Nifti1Image(arr, affine)
            nii.header.set_xyzt_units("mm", "sec")
            nii.set_qform(affine, code=1)
            nii.set_sform(affine, code=1)
            nib.save(nii, str(out / sub / f"{mhd.stem}.nii.gz"))
        training.append({"image": f"./imagesTr/{mhd.stem}.nii.gz", "label": f"./labelsTr/{mhd.stem}.nii.gz"})
        if progress:
            found = len(notes.get(mhd.stem, []))
            print(f"[{n + 1}/{len(scans)}] {mhd.stem}: {image.array.shape}, {found} nodule(s)", flush=True)
    meta = {
        "name": "LUNA16",
        "description": "LUNA16 scans with spherical nodule masks from annotations.csv (segmentation.luna16)",
        "reference": "https://luna16.grand-challenge.org",
        "licence": "CC BY 4.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "nodule"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path
