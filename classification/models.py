"""Classifiers: torchvision ResNet18/34/50 and MobileNetV2 with dropout before a new linear head.

Pure PyTorch: nothing is downloaded or read here (`weights=None` always). Loading a local torchvision weights file
and loading a trained checkpoint for inference live in `classification.checkpoint`.

Head layout (state-dict keys): ResNets `fc.0` dropout, `fc.1` linear; MobileNetV2 `classifier.0` dropout,
`classifier.1` linear (the same keys as torchvision's own MobileNetV2 head).
"""

from __future__ import annotations

import torchvision
from torch import nn

__all__ = ["MODEL_NAMES", "build_model", "head_prefix", "SmallCNN"]

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "small_cnn")


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

    def forward(self, x):  # noqa: ANN001, ANN201 - nn.Module convention
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
    model = torchvision.models.get_model(name, weights=None)
    if name.startswith("resnet"):
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    else:
        model.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.classifier[1].in_features, num_classes))
    return model
