"""Mask post-processing: keep the connected component at (or nearest to) the volume's centre.

A nodule crop (LIDC VOIs, a detector's candidate box) is centred on the nodule, so the component that holds the
centre, or failing that the one closest to it, is the nodule; the others are vessels, the pleura or noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["POSTPROCESS", "keep_central_component", "postprocess_mask"]

POSTPROCESS = ("none", "center_component")


def keep_central_component(mask: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """The 26-connected component of `mask` with the voxel nearest to the centre (mm when `spacing` is given).

    An empty mask is returned as it is.
    """
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask
    coords = np.argwhere(labels > 0)
    centre = (np.asarray(mask.shape) - 1) / 2
    scale = np.ones(mask.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    nearest = coords[np.argmin((((coords - centre) * scale) ** 2).sum(axis=1))]
    return labels == labels[tuple(nearest)]


def postprocess_mask(mask: np.ndarray, how: str, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Apply the named post-processing (`POSTPROCESS`) to a boolean mask."""
    if how == "none":
        return np.asarray(mask, dtype=bool)
    if how == "center_component":
        return keep_central_component(mask, spacing)
    raise ValueError(f"postprocess must be one of {POSTPROCESS}, got {how!r}")
