"""Recipe options: joint image/mask augmentation, speckle, mixup/cutmix, EMA, mask head, TTA, inference rebuild."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from classification.augment import PhotometricTrivialAugment, SpeckleNoise, TrainPipeline, mix_batch
from classification.engine import make_loss, make_step_fn, mask_loss, tta_logits
from classification.models import EMAClassifier, SegAuxClassifier, build_model, wrap_classifier


def test_geometry_moves_image_and_mask_together():
    torch.manual_seed(0)
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[:, 5:15, 5:15] = 255  # a bright square and its mask at the same place
    mask = (image[:1] > 0).to(torch.uint8) * 255
    pipe = TrainPipeline(32, "trivial", elastic=0.5, rotation=20)
    assert not {"ShearX", "TranslateX", "Rotate"} & set(PhotometricTrivialAugment._AUGMENTATION_SPACE)
    for _ in range(10):
        x, m = pipe(image, mask)
        assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        if m.sum() > 20:  # where the mask went, the square went: brighter inside than outside
            inside, outside = x[0][m[0] > 0].mean(), x[0][m[0] == 0].mean()
            assert inside > outside


def test_speckle_is_multiplicative():
    torch.manual_seed(0)
    x = torch.zeros(3, 8, 8)
    x[:, :4] = 0.5
    y = SpeckleNoise(0.3, p=1.0)(x.clone())
    assert torch.all(y[:, 4:] == 0)  # black stays black
    assert not torch.allclose(y[:, :4], x[:, :4]) and torch.allclose(y[0], y[1])
    assert torch.equal(SpeckleNoise(0.3, p=0.0)(x.clone()), x)


@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_mix_batch_mixes_targets_by_share(method):
    torch.manual_seed(1)
    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 10, 10).clone()
    targets = torch.eye(4)
    masks = torch.arange(4.0)[:, None, None, None].expand(4, 1, 10, 10).clone()
    alphas = {"mixup": (0.4, 0.0), "cutmix": (0.0, 1.0)}[method]
    x, t, m = mix_batch(images, targets, masks, *alphas)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert torch.allclose(x[:, :1], m)  # masks mixed exactly like the images
    # each image's mean value = its targets' weighted mean of the source values
    assert torch.allclose(x.mean((1, 2, 3)), t @ torch.arange(4.0), atol=1e-5)
    assert mix_batch(images, targets, None)[0] is images  # both off: untouched


def test_ema_tracks_weights_and_evaluates_the_average():
    torch.manual_seed(0)
    model = EMAClassifier(build_model("small_cnn", 3), decay=0.5)
    assert all(not p.requires_grad for p in model.ema.parameters())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net"}  # hvdtrain's optimizer takes requires_grad parameters only: never the EMA
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        model.train()
        loss = model(x).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w_net, w_ema = model.net.classifier[1].weight, model.ema.classifier[1].weight
    assert not torch.allclose(w_net, w_ema) and int(model.ema_updates) == 3
    model.eval()
    assert torch.allclose(model(x), model.ema.eval()(x))
    sd = model.state_dict()
    assert any(k.startswith("ema.") for k in sd) and "ema_updates" in sd


@pytest.mark.parametrize("name", ["small_cnn", "resnet10", "mobilenet_v2"])
def test_mask_head_outputs_and_loss_decreases(name):
    torch.manual_seed(0)
    model = SegAuxClassifier(build_model(name, 3))
    x = torch.randn(4, 3, 64, 64)
    logits, masks = model(x, with_mask=True)
    assert logits.shape == (4, 3) and masks.shape == (4, 1, 64, 64)
    model.eval()
    assert torch.allclose(model(x), model.net(x), atol=1e-5)  # the classifier path is the plain network's


def test_step_fn_with_mask_and_mix_trains():
    torch.manual_seed(0)
    model = wrap_classifier(build_model("small_cnn", 3), mask_head=True, ema_decay=0.9)
    loss_fn = make_loss([0, 1, 2, 0], 3, label_smoothing=0.1, class_weighted=True)
    step = make_step_fn(loss_fn, 3, mixup=0.2, cutmix=1.0, mask_weight=0.5)
    images = torch.randn(6, 3, 32, 32)
    masks = torch.zeros(6, 1, 32, 32)
    masks[:, :, 8:20, 8:20] = 1
    batch = (images, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6), masks)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    first = None
    for _ in range(15):
        loss, n = step(model, batch, torch.device("cpu"))
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert n == 6 and float(loss.detach()) < first


def test_mask_loss_hand_values():
    perfect = torch.full((1, 1, 4, 4), -20.0)
    perfect[..., :2, :] = 20.0
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    assert float(mask_loss(perfect, target)) == pytest.approx(0.0, abs=1e-4)
    assert float(mask_loss(-perfect, target)) > 10  # all wrong: large BCE and Dice near 1


def test_tta_averages_softmax_over_the_flip():
    class Asym(nn.Module):
        def forward(self, x):
            return torch.stack([x[..., :2].mean((1, 2, 3)), x[..., 2:].mean((1, 2, 3))], 1)

    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 4.0
    p = torch.softmax(tta_logits(Asym(), x, True), 1)
    assert torch.allclose(p, torch.full((1, 2), 0.5), atol=1e-6)  # symmetric after averaging with the flip
    assert torch.equal(tta_logits(Asym(), x, False), Asym()(x))


def test_inference_rebuilds_wrapped_square_model(tmp_path):
    from classification.checkpoint import inference_config, load_for_inference
    from classification.synthetic import generate

    generate(tmp_path / "us", n_per_class=2, size=48, seed=0, dup_fraction=0.0)
    model = wrap_classifier(build_model("small_cnn", 3), mask_head=True, ema_decay=0.99)
    cfg = {**inference_config("small_cnn", ["a", "b", "c"], 0.0, 32, 36), "resize_mode": "square",
           "mask_head": True, "ema_decay": 0.99}  # fmt: skip
    torch.save({"model": model.state_dict(), "config": cfg}, tmp_path / "best.pt")
    loaded, names, tf = load_for_inference(tmp_path / "best.pt")
    assert names == ["a", "b", "c"] and isinstance(loaded, EMAClassifier)
    from classification.data import list_images, load_rgb

    x = tf(load_rgb(list_images([tmp_path / "us"])[0]))
    assert x.shape == (3, 32, 32)
    assert torch.allclose(loaded(x[None]), model.eval()(x[None]))
