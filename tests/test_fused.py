"""Simulated SyncBatchNorm (hvdtrain.fused) on one process: grouping, per-GPU dropout streams, global-batch losses.
The end-to-end check against real ranks is in tests/test_simulation_exact.py."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from hvdtrain import SplitStep
from hvdtrain.fused import Groups, chunked_dropout, fused_step, split_output
from hvdtrain.pooling import GlobalStats
from segmentation.losses import DeepSupervisionLoss, DiceLoss


def _streams(*seeds: int) -> list:
    """The random state each seed leaves, as `chunked_dropout` takes them (CPU only)."""
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        states.append((torch.get_rng_state(), None))
    return states


def test_groups_hold_one_accumulation_index_of_every_simulated_gpu():
    loader = [f"b{i}" for i in range(8)]  # two steps of 2 simulated GPUs x 2 accumulation steps, GPU-major
    groups = list(Groups(loader, simulate_gpus=2, accum=2))
    assert len(Groups(loader, 2, 2)) == 4
    assert groups[0] == [(0, "b0"), (2, "b2")] and groups[1] == [(1, "b1"), (3, "b3")]
    assert groups[2] == [(0, "b4"), (2, "b6")]


def test_split_output_splits_nested_outputs():
    a, b = torch.arange(6.0).view(6, 1), torch.arange(12.0).view(6, 2)
    parts = split_output([a, (b, a)], [2, 4])
    assert torch.equal(parts[1][0], a[2:]) and torch.equal(parts[0][1][0], b[:2]) and isinstance(parts[0][1], tuple)


def test_chunked_dropout_draws_each_slice_from_its_own_stream():
    net = nn.Sequential(nn.Dropout(0.5), nn.Identity(), nn.Dropout3d(0.3))
    x = torch.ones(5, 4, 3, 3, 3)
    alone = []
    for seed, piece in zip((11, 12), x.split([2, 3])):  # each GPU on its own: seed, then its forward
        torch.manual_seed(seed)
        alone.append(net(piece))
    with chunked_dropout(net, [2, 3], _streams(11, 12), torch.device("cpu")):
        together = net(x)
    assert torch.equal(together, torch.cat(alone))
    assert not torch.equal(alone[0][0], alone[1][0])  # the streams differ
    assert "forward" not in vars(net[0])  # the layers' own forward is back


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.bn, self.drop = nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3), nn.Dropout3d(0.2)
        self.head = nn.Conv3d(3, 1, 1)

    def forward(self, x):
        y = self.head(self.drop(self.bn(self.conv(x))))
        return [y, F.avg_pool3d(y, 2)]


def test_fused_step_is_the_whole_batch_step_with_a_pooled_dice():
    """Two GPUs' micro-batches forwarded together with a global-batch Dice: the loss and gradient of BatchNorm and
    Dice over the whole batch (the dropout masks drawn per slice, as the control draws them)."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8, 4, generator=g), (torch.rand(4, 1, 8, 8, 4, generator=g) > 0.8).float()

    stats = GlobalStats()
    loss_fn = DeepSupervisionLoss(DiceLoss("sigmoid", batch_dice=True, ce_weight=1.0, reduce_fn=stats))
    step = SplitStep(lambda b, d: (b[0], {}, lambda out: (loss_fn(out, b[1]), 2)), stats)
    fused_net = _BNNet()
    loss, n = fused_step(
        fused_net, [(0, (x[:2], t[:2])), (1, (x[2:], t[2:]))], step, torch.manual_seed, torch.device("cpu")
    )
    loss.backward()

    whole_net = _BNNet()
    with chunked_dropout(whole_net, [2, 2], _streams(0, 1), torch.device("cpu")):
        out = whole_net(x)
    whole = DeepSupervisionLoss(DiceLoss("sigmoid", batch_dice=True, ce_weight=1.0))(out, t)
    whole.backward()
    assert n == 4
    torch.testing.assert_close(loss, whole, atol=1e-6, rtol=1e-6)
    for (name, a), b in zip(whole_net.named_parameters(), fused_net.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(fused_net.bn.running_mean, whole_net.bn.running_mean)


def test_fused_step_gives_the_gradient_of_the_micro_batches_one_by_one():
    """--fuse-simulated on the instance-norm U-Net (dropout, deep supervision, global-batch Dice): one step's gradient
    equals that of the statistics pass + micro-batch by micro-batch path that equals real ranks bit for bit."""
    import copy

    from hvdtrain.pooling import statistics_pass
    from segmentation.unet import UNet3D

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 16, 16, 8, generator=g), (torch.rand(4, 1, 16, 16, 8, generator=g) > 0.8).float()
    torch.manual_seed(0)
    fused_net = UNet3D(features=4, depth=2, deep_supervision=True, dropout=0.2)
    apart_net = copy.deepcopy(fused_net)

    def split_step():
        stats = GlobalStats()
        loss_fn = DeepSupervisionLoss(DiceLoss("sigmoid", batch_dice=True, ce_weight=1.0, reduce_fn=stats))
        return SplitStep(lambda b, d: (b[0], {}, lambda out: (loss_fn(out, b[1]), 2)), stats)

    group = [(0, (x[:2], t[:2])), (1, (x[2:], t[2:]))]
    cpu = torch.device("cpu")

    def reseed(m):
        return torch.manual_seed(100 + m)

    loss, _ = fused_step(fused_net, group, split_step(), reseed, cpu)
    loss.backward()
    step = split_step()
    statistics_pass(apart_net, [b for _, b in group], step, step.global_stats, reseed, cpu, contextlib.nullcontext)
    for m, batch in group:
        reseed(m)
        (step(apart_net, batch, cpu)[0] / len(group)).backward()
    for (name, a), b in zip(apart_net.named_parameters(), fused_net.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
