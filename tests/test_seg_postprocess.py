"""Centre-component post-processing and test-time mirroring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segmentation.inference import predict_probabilities
from segmentation.postprocess import keep_central_component, postprocess_mask


def _blob(shape, centre, r):
    g = np.indices(shape)
    return sum((g[i] - c) ** 2 for i, c in enumerate(centre)) <= r * r


def test_keeps_the_component_holding_the_centre():
    shape = (21, 22, 9)
    centre_blob, side_blob = _blob(shape, (10, 10, 4), 3), _blob(shape, (2, 19, 4), 2)
    out = keep_central_component(centre_blob | side_blob)
    assert out.dtype == bool and np.array_equal(out, centre_blob)


def test_without_a_centre_component_the_nearest_wins_in_mm():
    shape = (31, 31, 11)
    near_in_voxels = _blob(shape, (15, 15, 1), 1)  # 4 voxels away along Z
    near_in_mm = _blob(shape, (15, 22, 5), 1)  # 7 voxels away along Y
    mask = near_in_voxels | near_in_mm
    assert np.array_equal(keep_central_component(mask), near_in_voxels)
    # With 2.5 mm slices and 0.7 mm pixels, 4 slices (10 mm) are farther than 7 pixels (4.9 mm).
    assert np.array_equal(keep_central_component(mask, spacing=(0.7, 0.7, 2.5)), near_in_mm)


def test_diagonal_neighbours_are_one_component_and_empty_masks_pass():
    mask = np.zeros((5, 5, 5), bool)
    mask[2, 2, 2] = mask[3, 3, 3] = mask[0, 0, 0] = True
    out = keep_central_component(mask)
    assert out[2, 2, 2] and out[3, 3, 3] and not out[0, 0, 0]
    assert not keep_central_component(np.zeros((4, 4, 4), bool)).any()
    assert np.array_equal(postprocess_mask(mask, "none"), mask)
    with pytest.raises(ValueError, match="postprocess must be one of"):
        postprocess_mask(mask, "largest")


class _Skewed(nn.Module):
    """A model that is not mirror-symmetric, so mirroring changes its output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)
        torch.manual_seed(0)
        nn.init.normal_(self.conv.weight)

    def forward(self, x):
        return self.conv(x) + x.cumsum(dim=2)


def test_tta_averages_the_mirrored_predictions():
    model = _Skewed().eval()
    image = np.random.default_rng(0).random((13, 11, 7)).astype(np.float32)
    kw = {"roi_size": (8, 8, 8), "overlap": 0.5}
    plain = predict_probabilities(model, image, **kw)
    flipped = predict_probabilities(model, image[::-1].copy(), **kw)[::-1]
    both = predict_probabilities(model, image, tta_flips=(0,), **kw)
    assert not np.allclose(plain, flipped, atol=1e-3)
    np.testing.assert_allclose(both, (plain + flipped) / 2, atol=1e-6)
    assert predict_probabilities(model, image, tta_flips=(0, 1, 2), **kw).shape == image.shape
