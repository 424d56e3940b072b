"""The GPU fast paths compute the same thing: channels-last models match contiguous ones on the CPU, the
pinned-memory loader path is a no-op without a GPU, and `fit` takes the new flags."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from classification.models import build_model as build_classifier
from hvdtrain import Run, TrainConfig, data, dist, fastpath, fit
from hvdtrain.testing import ToyMetric, ToyNet, eval_fn, make_blobs, step_fn
from segmentation.unet import UNet3D


@pytest.fixture(autouse=True, scope="module")
def one_rank():
    dist.init(threads=1)


def _forward_backward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    outs = model(x)
    outs = outs if isinstance(outs, list) else [outs]  # deep supervision: every head gets a gradient
    sum((o.float() ** 2).mean() for o in outs).backward()
    return outs[0].detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("make", "shape", "fmt"),
    [
        (lambda: UNet3D(1, 1, features=4, depth=2, deep_supervision=True), (2, 1, 33, 34, 35), torch.channels_last_3d),
        (lambda: build_classifier("small_cnn", 3), (2, 3, 37, 41), torch.channels_last),
    ],
    ids=["unet3d", "cnn2d"],
)
def test_channels_last_gives_the_same_outputs_and_gradients(make, shape, fmt):
    torch.manual_seed(0)
    ref = make().train()
    fast = copy.deepcopy(ref)
    fastpath.prepare_model(fast, torch.device("cpu"), channels_last=True, cudnn_benchmark=True)
    assert fastpath.memory_format_for(fast) == fmt
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert all(c.weight.is_contiguous(memory_format=fmt) for c in convs if c.weight.dim() == len(shape))
    assert not all(c.weight.is_contiguous() for c in convs), "the weights really are in another layout"
    x = torch.randn(shape)
    out_ref, g_ref = _forward_backward(ref, x)
    out_fast, g_fast = _forward_backward(fast, fastpath.to_device(x, torch.device("cpu"), fmt))
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    assert g_fast.keys() == g_ref.keys()
    for k in g_ref:
        torch.testing.assert_close(g_fast[k], g_ref[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_models_without_convolutions_stay_contiguous():
    assert fastpath.memory_format_for(torch.nn.Linear(3, 2)) == torch.contiguous_format
    x = torch.randn(2, 3)
    assert fastpath.to_device(x, torch.device("cpu"), torch.channels_last_3d) is x  # wrong rank: left alone


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the GPU-only paths")
def test_pinned_memory_and_cudnn_paths_are_no_ops_on_the_cpu():
    before = torch.backends.cudnn.benchmark
    fastpath.prepare_model(ToyNet(4), torch.device("cpu"), channels_last=False, cudnn_benchmark=not before)
    assert torch.backends.cudnn.benchmark == before
    ds = TensorDataset(torch.arange(12.0).view(6, 2), torch.arange(6))
    loader = data.train_loader(ds, 2, seed=3)
    assert loader.pin_memory is False
    batches = list(loader)
    for x, _y in batches:
        assert not x.is_pinned()
        assert torch.equal(fastpath.to_device(x, torch.device("cpu")), x)
    assert sorted(int(i) for _, y in batches for i in y) == list(range(6))


def test_fit_with_channels_last_matches_fit_without(tmp_path):
    ds, val = make_blobs(32, 12, seed=0), make_blobs(8, 12, seed=1)

    def run(name: str, channels_last: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = ToyNet(4)
        cfg = TrainConfig(
            run_dir=str(tmp_path / name), epochs=2, batch_size_per_gpu=8, lr=0.05, lr_rule="none", warmup_epochs=0,
            schedule="constant", optimizer="sgd", progress=False, channels_last=channels_last,
        )  # fmt: skip
        fit(Run(model, data.train_loader(ds, 8), data.eval_loader(val, 8), step_fn, eval_fn, ToyMetric, monitor="loss",
                mode="min"), cfg)  # fmt: skip
        return {k: v.contiguous() for k, v in model.state_dict().items()}

    a, b = run("plain", False), run("cl", True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
