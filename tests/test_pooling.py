"""Global-batch statistics pooled over micro-batches (hvdtrain.pooling), on one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hvdtrain.pooling import GlobalStats, running_stats_frozen, statistics_pass
from segmentation.losses import DeepSupervisionLoss, DiceLoss


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 8, 8, 4, generator=g)
    target = (torch.rand(4, 1, 8, 8, 4, generator=g) > 0.8).float()
    target[1] = 0  # a patch without foreground
    return x, target


class _Net(torch.nn.Module):
    """Two deep-supervision outputs, as the U-Net's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv3d(2, 1, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return [y, F.avg_pool3d(y, 2)]


def _loss(reduce_fn=None):
    return DeepSupervisionLoss(DiceLoss("sigmoid", batch_dice=True, ce_weight=1.0, reduce_fn=reduce_fn))


def test_pooled_micro_batches_give_the_whole_batch_loss_and_gradient():
    x, t = _data()
    whole = _Net()
    whole_loss = _loss()(whole(x), t)
    whole_loss.backward()

    net, stats = _Net(), GlobalStats()
    loss_fn = _loss(stats)
    halves = [(x[:2], t[:2]), (x[2:], t[2:])]
    statistics_pass(
        net, halves, lambda m, b, d: loss_fn(m(b[0]), b[1]), stats, lambda m: None, torch.device("cpu"),
        torch.autograd.grad_mode.no_grad,
    )  # fmt: skip
    values = []
    for xb, tb in halves:  # the training pass, as the loop runs it: each micro-batch's loss / micro-batches
        loss = loss_fn(net(xb), tb)
        (loss / 2).backward()
        values.append(loss.item())
    for p, q in zip(net.parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
    # The Dice part is the whole batch's in both micro-batches; the BCE part each micro-batch's own mean.
    assert sum(values) / 2 == pytest.approx(whole_loss.item(), abs=1e-6)

    # Control: Dice pooled per micro-batch (what accumulation gave before) is a different gradient.
    naive = _Net()
    for xb, tb in halves:
        (_loss()(naive(xb), tb) / 2).backward()
    assert (naive.conv.weight.grad - whole.conv.weight.grad).abs().max() > 1e-3


def test_frozen_running_statistics_stay_and_the_backward_still_runs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with running_stats_frozen(model):
        y = model(x)
    y.square().sum().backward()  # autograd saved the running buffers: they must not have been rewritten
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[1].momentum == 0.1
    y2 = model(x)  # batch statistics, as before; now the running statistics move
    torch.testing.assert_close(y, y2)
    assert not torch.equal(before["1.running_mean"], model[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1


def test_outside_a_statistics_pass_it_is_the_sum_over_ranks():
    s = torch.tensor([1.0, 2.0, 3.0])
    assert GlobalStats()(s) is s  # one process: the identity, as dist.allreduce_sum_grad
