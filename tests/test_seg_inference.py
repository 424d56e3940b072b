"""Sliding-window inference reproduces a whole-volume forward pass; windows cover every voxel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segmentation.inference import gaussian_importance, predict_probabilities, sliding_window_inference, window_starts
from segmentation.unet import UNet3D

torch.manual_seed(0)


def _pointwise() -> nn.Module:
    """No boundary effect: every output voxel depends on its own input voxel only."""
    return nn.Sequential(nn.Conv3d(1, 4, 1), nn.Tanh(), nn.Conv3d(4, 2, 1)).eval()


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
def test_pointwise_model_matches_whole_volume(overlap):
    model = _pointwise()
    x = torch.randn(2, 1, 33, 34, 35)
    with torch.no_grad():
        whole = model(x)
        slid = sliding_window_inference(x, (16, 12, 20), model, overlap=overlap, sw_batch_size=3)
    assert slid.shape == whole.shape
    torch.testing.assert_close(slid, whole, atol=1e-5, rtol=1e-5)


def test_window_larger_than_volume_pads_and_crops():
    # One 3x3x3 linear convolution with zero padding: padding the input with zeros changes nothing inside.
    conv = nn.Conv3d(1, 1, 3, padding=1).eval()
    x = torch.randn(1, 1, 9, 10, 11)
    with torch.no_grad():
        slid = sliding_window_inference(x, (16, 16, 16), conv, overlap=0.5, pad_value=0.0)
        torch.testing.assert_close(slid, conv(x), atol=1e-5, rtol=1e-5)


def test_unet_window_equal_to_volume_is_one_forward():
    model = UNet3D(features=4, depth=2).eval()
    x = torch.randn(1, 1, 17, 18, 19)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window_inference(x, (17, 18, 19), model), model(x))


def test_unet_interior_matches_with_overlap():
    """A real U-Net has border effects, but windows that overlap a lot agree with the whole volume in most voxels."""
    model = UNet3D(features=4, depth=2).eval()
    x = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        whole = torch.sigmoid(model(x))
        slid = sliding_window_inference(x, (16, 16, 16), lambda w: torch.sigmoid(model(w)), overlap=0.75)
    assert (slid - whole).abs().mean() < 0.05


def test_window_starts_cover_the_axis():
    for size in (1, 15, 16, 17, 33, 100):
        for overlap in (0.0, 0.5, 0.9):
            starts = window_starts(size, 16, overlap)
            covered = set()
            for s in starts:
                covered.update(range(s, min(s + 16, size)))
            assert covered == set(range(size)) and starts[0] == 0
            assert starts[-1] == max(size - 16, 0)


def test_gaussian_importance():
    w = gaussian_importance((8, 9, 10))
    assert w.shape == (8, 9, 10) and w.min() > 0 and w.max() == pytest.approx(1.0)
    assert w[4, 4, 5] > w[0, 0, 0]


def test_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(torch.zeros(1, 1, 4, 4, 4), (2, 2, 2), lambda w: w, overlap=1.0)


def test_predict_probabilities_shapes():
    model = UNet3D(features=4, depth=2).eval()
    prob = predict_probabilities(model, torch.randn(11, 13, 7).numpy(), (8, 8, 8), overlap=0.5)
    assert prob.shape == (11, 13, 7) and 0 <= prob.min() and prob.max() <= 1
