"""Checks of a CT volume's voxels and geometry before anything is trained or cached on it.

Pure functions on arrays, affines and spacings (whatever reader produced them: nibabel, SimpleITK); each raises a
`segmentation.io.DataError` subclass whose message names the file, what is wrong and where (the voxel index of the
first NaN, the offending spacing). A NaN voxel would otherwise flow through resampling and normalisation into the
cache and the loss, and training would end "successfully" on garbage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io import DataError

__all__ = [
    "NonFiniteError",
    "GeometryError",
    "EmptyLabelError",
    "MAX_SPACING_MM",
    "MIN_SPACING_MM",
    "check_finite",
    "check_affine",
    "check_spacing",
    "check_label_not_empty",
    "check_volume",
]

#: spacings outside [MIN, MAX] mm are not CT: a header in metres or microns, or a broken converter
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 100.0


class NonFiniteError(DataError):
    """A volume with NaN or infinite voxels."""


class GeometryError(DataError):
    """A zero, negative, non-finite or absurd spacing, or an affine that is not invertible."""


class EmptyLabelError(DataError):
    """A label without foreground where foreground is required."""


def check_finite(array: np.ndarray, path: str | Path, what: str = "image") -> None:
    """Raise NonFiniteError naming the first non-finite voxel (index and value) and how many there are."""
    a = np.asarray(array)
    if not np.issubdtype(a.dtype, np.floating) or np.isfinite(a).all():
        return
    bad = ~np.isfinite(a)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise NonFiniteError(
        f"{what} {path} has {int(bad.sum())} non-finite voxel(s) (NaN or inf); the first is {a[first]} at voxel "
        f"index {first} of shape {a.shape}"
    )


def check_spacing(spacing: Sequence[float], path: str | Path) -> None:
    """Raise GeometryError unless every voxel size is finite and within [MIN_SPACING_MM, MAX_SPACING_MM]."""
    s = np.asarray(spacing, dtype=np.float64)
    for axis, v in enumerate(s):
        if not np.isfinite(v) or v <= 0:
            raise GeometryError(f"{path}: voxel spacing {s.tolist()} has a zero, negative or non-finite axis {axis}")
        if not MIN_SPACING_MM <= v <= MAX_SPACING_MM:
            raise GeometryError(
                f"{path}: voxel spacing {v:g} mm on axis {axis} is outside [{MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] "
                f"mm (spacing {s.tolist()}): check the header's units"
            )


def check_affine(affine: np.ndarray, path: str | Path) -> None:
    """Raise GeometryError unless the 4x4 voxel-to-world affine is finite, with sane spacing, and invertible."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise GeometryError(f"{path}: the affine must be a finite 4x4 matrix, found {np.round(a, 4).tolist()}")
    check_spacing(np.sqrt((a[:3, :3] ** 2).sum(axis=0)), path)
    # Relative to the spacings: columns of sane length that are (nearly) parallel still give a singular grid.
    det = abs(np.linalg.det(a[:3, :3])) / np.prod(np.sqrt((a[:3, :3] ** 2).sum(axis=0)))
    if det < 1e-6:
        raise GeometryError(f"{path}: the affine is not invertible (its axes are parallel):\n{np.round(a, 4)}")


def check_label_not_empty(label: np.ndarray, path: str | Path) -> None:
    """Raise EmptyLabelError when `label` has no foreground voxel."""
    if not np.any(label):
        raise EmptyLabelError(f"label {path} has no foreground voxel, but this case needs one")


def check_volume(data: np.ndarray, affine: np.ndarray, path: str | Path, what: str = "image") -> None:
    """Every check of one volume read from `path`: geometry, then finite voxels."""
    check_affine(affine, path)
    check_finite(data, path, what)
