"""A lung mask from HU thresholds, for restricting nodule prediction to the lungs on a whole chest CT.

A model trained on crops around nodules has never seen the mediastinum, bowel or the table, and fires there on
a whole CT. The classic guard (thresholding + connected components, e.g. Hofmanninger et al. 2020's baseline,
the LUNA16 preprocessing tutorials): the body is the largest component above `body_hu`, with every axial
slice's holes filled; the lungs are the large air components (below `air_hu`) inside it; then each axial slice's
holes are filled (vessels, central nodules) and a morphological closing of `close_mm` takes in nodules attached
to the pleura, which the threshold cuts off as notches in the lung's outline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["lung_mask", "axial_axis"]


def axial_axis(affine: np.ndarray) -> int:
    """The array axis closest to the world's superior-inferior (z) axis: the one that indexes axial slices."""
    return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[axis]):
        idx = [slice(None)] * 3
        idx[axis] = k
        out[tuple(idx)] = ndimage.binary_fill_holes(mask[tuple(idx)])
    return out


def _close(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Closing by a ball of `radius_mm` (world mm, so anisotropic voxels are handled) from two distance maps.

    Computed inside the mask's bounding box on a grid of voxels of up to 2 mm (max-pooled, so the result can only
    grow by under a voxel of that grid): a 3-D distance map of a whole 512x512 CT takes tens of seconds.
    """
    if radius_mm <= 0 or not mask.any():
        return mask
    factor = [max(1, int(2.0 / s)) for s in spacing]
    coarse_sp = [s * f for s, f in zip(spacing, factor)]
    pad = [(int(np.ceil(radius_mm / c)) + 1) * f for c, f in zip(coarse_sp, factor)]
    nz = np.argwhere(mask)
    lo = [max(0, int(a) - p) for a, p in zip(nz.min(0), pad)]
    hi = [min(n, int(b) + 1 + p) for b, p, n in zip(nz.max(0), pad, mask.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = mask[box]
    # Pad to whole blocks plus the radius, then max-pool into blocks of `factor` voxels.
    ext = [(-n) % f + p for n, f, p in zip(sub.shape, factor, pad)]
    sub = np.pad(sub, [(p, e) for p, e in zip(pad, ext)])
    blocks = sub.reshape(_blocks(sub.shape, factor))
    coarse = blocks.any(axis=(1, 3, 5))
    dilated = ndimage.distance_transform_edt(~coarse, sampling=coarse_sp) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=coarse_sp) > radius_mm
    fine = closed.repeat(factor[0], 0).repeat(factor[1], 1).repeat(factor[2], 2)
    out = mask.copy()
    out[box] |= fine[tuple(slice(p, p + n) for p, n in zip(pad, mask[box].shape))]
    return out


def _blocks(shape: Sequence[int], factor: Sequence[int]) -> tuple[int, ...]:
    return tuple(v for n, f in zip(shape, factor) for v in (n // f, f))


def lung_mask(
    hu: np.ndarray,
    spacing: Sequence[float],
    axis: int = 2,
    air_hu: float = -400.0,
    body_hu: float = -500.0,
    min_share: float = 0.2,
    close_mm: float = 10.0,
) -> np.ndarray:
    """Boolean mask of the lungs (with the airways) of a chest CT in Hounsfield units.

    Args:
        hu: the CT volume (any axis order).
        spacing: mm per voxel along each array axis (`segmentation.preprocess.spacing_of(affine)`).
        axis: the array axis of axial slices (`axial_axis(affine)`).
        air_hu: voxels below are air (lung parenchyma is about -850, soft tissue above -100).
        body_hu: voxels above belong to the body (the largest such component, table and clothes excluded).
        min_share: keep air components of at least this share of the largest (both lungs, not bowel gas).
        close_mm: radius of the closing that takes in juxtapleural nodules.

    Returns:
        A boolean array of `hu`'s shape; all False when no air is found inside the body.
    """
    hu = np.asarray(hu)
    labels, n = ndimage.label(hu > body_hu)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    body = _fill_slices(labels == 1 + int(np.argmax(sizes)), axis)
    air, n = ndimage.label((hu < air_hu) & body)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(air.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_share * sizes.max()) + 1
    lungs = _fill_slices(np.isin(air, keep), axis)
    return _close(lungs, close_mm, spacing) & body
