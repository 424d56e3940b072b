"""3D U-Net output shapes for odd sizes, norms, deep supervision."""

from __future__ import annotations

import pytest
import torch

from segmentation.unet import UNet3D


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_odd_input_shape(norm):
    model = UNet3D(features=4, depth=3, norm=norm)
    out = model(torch.randn(2, 1, 33, 34, 35))
    assert out.shape == (2, 1, 33, 34, 35)


def test_multichannel_and_depth():
    model = UNet3D(in_channels=2, out_channels=3, features=4, depth=2, dropout=0.1).eval()
    assert model(torch.randn(1, 2, 9, 16, 7)).shape == (1, 3, 9, 16, 7)


def test_deep_supervision_outputs_in_training_only():
    model = UNet3D(features=4, depth=3, deep_supervision=True)
    outs = model(torch.randn(2, 1, 33, 34, 35))
    assert [tuple(o.shape[2:]) for o in outs] == [(33, 34, 35), (17, 17, 18), (9, 9, 9)]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 33, 34, 35)).shape == (1, 1, 33, 34, 35)


def test_backward_reaches_every_parameter():
    model = UNet3D(features=4, depth=2, deep_supervision=True)
    outs = model(torch.randn(2, 1, 12, 12, 12))
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        UNet3D(norm="layer")
    with pytest.raises(ValueError, match="depth"):
        UNet3D(depth=0)


@pytest.mark.parametrize("residual", [False, True])
def test_residual_and_narrow_top_level_keep_shapes(residual):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 33, 34, 35)
    net = UNet3D(features=8, depth=3, residual=residual, top_features=4, deep_supervision=True)
    first_conv = net.encoders[0].body[0] if residual else net.encoders[0][0]
    assert first_conv.out_channels == 4
    outs = net.train()(x)
    assert [tuple(o.shape) for o in outs] == [(2, 1, 33, 34, 35), (2, 1, 17, 17, 18), (2, 1, 9, 9, 9)]
    assert net.eval()(x).shape == (2, 1, 33, 34, 35)
    full = sum(p.numel() for p in UNet3D(features=8, depth=3, residual=residual).parameters())
    assert sum(p.numel() for p in net.parameters()) < full


def test_residual_block_adds_its_input():
    from segmentation.unet import ResBlock

    block = ResBlock(4, 4, "instance", 0.0)
    for m in block.body:
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.zeros_(m.weight)
    x = torch.rand(1, 4, 6, 6, 6)  # positive: LeakyReLU keeps it, so a zero body gives back x
    torch.testing.assert_close(block(x), x)
    assert isinstance(ResBlock(2, 4, "batch", 0.1).skip, torch.nn.Conv3d)


def test_strided_stem_keeps_shapes_and_runs_its_blocks_at_half_resolution():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 33, 34, 35)
    net = UNet3D(features=4, depth=3, stem=2, deep_supervision=True)
    seen = []
    net.encoders[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[2:])))
    outs = net.train()(x)
    assert [tuple(o.shape) for o in outs] == [(2, 1, 33, 34, 35), (2, 1, 17, 17, 18), (2, 1, 9, 9, 9)]
    assert seen == [(24, 24, 24)]  # padded to a multiple of 2**(3 + 1) = 16 (48), then halved by the stem
    assert net.eval()(x).shape == (2, 1, 33, 34, 35)
    sum(o.mean() for o in net.train()(x)).backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="stem"):
        UNet3D(stem=4)
