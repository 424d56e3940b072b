"""Classifiers: torchvision ResNet18/34/50 and MobileNetV2 with dropout before a new linear head.

Pure PyTorch: nothing is downloaded or read here (`weights=None` always). Loading a local torchvision weights file
and loading a trained checkpoint for inference live in `classification.checkpoint`.

Head layout (state-dict keys): ResNets `fc.0` dropout, `fc.1` linear; MobileNetV2 `classifier.0` dropout,
`classifier.1` linear (the same keys as torchvision's own MobileNetV2 head).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "wrap_classifier",
    "head_prefix",
    "SmallCNN",
    "SegAuxClassifier",
    "EMAClassifier",
    "encoder_and_head",
]

MODEL_NAMES = ("resnet10", "resnet18", "resnet34", "resnet50", "mobilenet_v2", "small_cnn")


class SmallCNN(nn.Module):
    """A four-block CNN for CPU demos and tests (~100k parameters); not part of the study.

    Input (N, 3, H, W) with H, W >= 16; output logits (N, num_classes).
    """

    def __init__(self, num_classes: int, dropout: float = 0.0, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(4):
            c_out = width * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x):  # nn.Module convention
        return self.classifier(self.pool(self.features(x)).flatten(1))


def head_prefix(name: str) -> str:
    """State-dict prefix of the linear layer of the head (`fc.1` or `classifier.1`)."""
    return "fc.1" if name.startswith("resnet") else "classifier.1"


def build_model(name: str, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """A randomly initialised classifier.

    Args:
        name: one of `MODEL_NAMES`.
        num_classes: outputs of the head (2 or more).
        dropout: dropout probability applied to the pooled features before the linear head.

    Returns:
        A module mapping (N, 3, H, W) float images to (N, num_classes) logits. H, W >= 32 for the torchvision
        models (they downsample 32x).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if name == "small_cnn":
        return SmallCNN(num_classes, dropout)
    if name == "resnet10":  # one BasicBlock per stage: a small ResNet for training from scratch on ~600 images
        model = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1])
    else:
        model = torchvision.models.get_model(name, weights=None)
    if name.startswith("resnet"):
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    else:
        model.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.classifier[1].in_features, num_classes))
    return model


def encoder_and_head(net: nn.Module) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], int]:
    """(features: x -> (N, F, h, w), head: features -> logits, F) of a model made by `build_model`."""
    if isinstance(net, torchvision.models.ResNet):

        def features(x: Tensor) -> Tensor:
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            return net.layer4(net.layer3(net.layer2(net.layer1(x))))

        return features, lambda f: net.fc(torch.flatten(net.avgpool(f), 1)), net.fc[1].in_features
    if isinstance(net, SmallCNN):
        return net.features, lambda f: net.classifier(net.pool(f).flatten(1)), net.classifier[1].in_features
    if isinstance(net, torchvision.models.MobileNetV2):
        pool = lambda f: torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)
        return net.features, lambda f: net.classifier(pool(f)), net.classifier[1].in_features
    raise TypeError(f"no encoder split for {type(net).__name__}")


class SegAuxClassifier(nn.Module):
    """A classifier with a small segmentation head on its last feature map (auxiliary lesion-mask supervision).

    `forward(x)` gives logits (N, K) as the plain classifier; `forward(x, with_mask=True)` also gives mask logits
    (N, 1, H, W) at the input size (the head's coarse map upsampled bilinearly). State-dict keys: `net.*` (the
    plain classifier's own keys under `net.`), `seg.*` (the head).
    """

    def __init__(self, net: nn.Module, hidden: int = 64) -> None:
        super().__init__()
        self.net = net
        width = encoder_and_head(net)[2]
        self.seg = nn.Sequential(
            nn.Conv2d(width, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, x: Tensor, with_mask: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        features, head, _ = encoder_and_head(self.net)  # per call: closures must follow deepcopies (EMA)
        f = features(x)
        logits = head(f)
        if not with_mask:
            return logits
        m = nn.functional.interpolate(self.seg(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, m


class EMAClassifier(nn.Module):
    """A model and an exponential moving average of its weights; evaluation (eval mode) runs the average.

    Each training-mode forward first folds the current weights into the average (after the previous optimizer
    step), with the warm-up `decay_t = min(decay, (1 + t) / (10 + t))`; buffers (BatchNorm statistics) are copied.
    The average's parameters have `requires_grad=False` (`ema.*` in the state dict), so hvdtrain's optimizer (which
    takes trainable parameters only) and the gradient allreduce never see them.
    Keys: `net.*` (the trained model), `ema.*` (its average), `ema_updates`.
    """

    def __init__(self, net: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.net, self.decay = net, float(decay)
        self.ema = copy.deepcopy(net)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (called by `forward` in training mode)."""
        t = int(self.ema_updates)
        d = min(self.decay, (1 + t) / (10 + t))
        for e, p in zip(self.ema.parameters(), self.net.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.ema.buffers(), self.net.buffers()):
            e.copy_(b)
        self.ema_updates += 1

    def forward(self, x: Tensor, **kwargs: Any) -> Any:
        if self.training:
            self.update()
            return self.net(x, **kwargs)
        return self.ema(x, **kwargs)


def wrap_classifier(net: nn.Module, mask_head: bool = False, ema_decay: float = 0.0) -> nn.Module:
    """A `build_model` network, optionally with the segmentation head (`SegAuxClassifier`) and EMA (`EMAClassifier`)."""
    if mask_head:
        net = SegAuxClassifier(net)
    if ema_decay > 0:
        net = EMAClassifier(net, ema_decay)
    return net
