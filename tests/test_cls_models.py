"""Classifier models, local weights loading, and the step/eval functions handed to hvdtrain.fit."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from classification.checkpoint import CheckpointError, inference_config, load_for_inference, load_pretrained
from classification.engine import class_weights, eval_fn, make_loss, make_step_fn, metric_factory
from classification.models import MODEL_NAMES, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_classes", [2, 3])
def test_output_shapes(name, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes, dropout=0.3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 33, 35))  # odd sizes on purpose
    assert out.shape == (2, num_classes)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and drops[-1].p == 0.3


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg16", 3)
    with pytest.raises(ValueError):
        build_model("resnet18", 1)


def test_load_torchvision_weights_replaces_head(tmp_path):
    """A torchvision file with a 1000-class head: backbone loaded strictly, head left fresh."""
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("resnet18", 3)
    assert load_pretrained(model, "resnet18", tmp_path / "resnet18.pth") is False
    assert torch.equal(model.conv1.weight, ref.conv1.weight)
    assert model.fc[1].weight.shape == (3, 512)
    # Same class count (a previous run's checkpoint dict, with a DDP prefix): head loaded too.
    other = build_model("resnet18", 3)
    torch.save({"model": {f"module.{k}": v for k, v in other.state_dict().items()}}, tmp_path / "ckpt.pt")
    assert load_pretrained(model, "resnet18", tmp_path / "ckpt.pt") is True
    assert torch.equal(model.fc[1].weight, other.fc[1].weight)


def test_load_mobilenet_weights(tmp_path):
    ref = torchvision.models.mobilenet_v2(weights=None, num_classes=2)
    torch.save(ref.state_dict(), tmp_path / "mb.pth")
    model = build_model("mobilenet_v2", 2)
    assert load_pretrained(model, "mobilenet_v2", tmp_path / "mb.pth") is True
    assert torch.equal(model.classifier[1].weight, ref.classifier[1].weight)


def test_wrong_weights_file(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="r18.pth"):
        load_pretrained(build_model("resnet34", 2), "resnet34", tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_pretrained(build_model("resnet18", 2), "resnet18", tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_pretrained(build_model("resnet18", 2), "resnet18", tmp_path / "absent.pth")


def test_load_for_inference(tmp_path):
    model = build_model("small_cnn", 3, 0.1)
    cfg = {"epochs": 1, **inference_config("small_cnn", ["a", "b", "c"], 0.1, image_size=32)}
    torch.save({"model": model.state_dict(), "epoch": 0, "config": cfg}, tmp_path / "best.pt")
    loaded, names, tf = load_for_inference(tmp_path / "best.pt")
    assert names == ["a", "b", "c"] and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model.eval()(x))
    torch.save({"model": model.state_dict(), "config": {"model_name": "small_cnn"}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="class_names"):
        load_for_inference(tmp_path / "bad.pt")


def test_loss_step_and_eval_fns():
    w = class_weights([0, 0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 0.0]))
    model = build_model("small_cnn", 3)
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), torch.tensor([3, 0, 2, 1]))
    loss_fn = make_loss([0, 0, 1, 2], 3, label_smoothing=0.1, class_weighted=True)
    loss, n = make_step_fn(loss_fn)(model, batch, torch.device("cpu"))
    assert n == 4 and loss.ndim == 0 and loss.requires_grad
    metric = metric_factory(["a", "b", "c"], 4)()
    with torch.no_grad():
        eval_fn(model.eval(), batch, torch.device("cpu"), metric)
    out = metric.compute()
    assert out["count"] == 4 and 0 <= out["accuracy"] <= 1 and out["loss"] > 0
