"""Weights in and out of the classifiers: local torchvision weights files and trained checkpoints for inference.

Kept apart from `models.py` so that the model file stays free of I/O.

Checkpoints follow the hvdtrain contract (`{"model": state_dict, ..., "config": dict}`). For inference,
`checkpoint["config"]` must hold (see `inference_config`):

=============== ======================================================== ==========================
key             meaning                                                  if absent
=============== ======================================================== ==========================
model_name      one of `models.MODEL_NAMES`                              the job config's `model`
class_names     list of class names; label i is class_names[i]            required
num_classes     len(class_names)                                         len(class_names)
dropout         dropout before the head (no effect in eval mode)         0.0
image_size      centre-crop side of the evaluation transform             224
resize_size     short side before the crop (side of the square)          image_size * 256 / 224
resize_mode     "square" (cached pipeline) or "short_side"               short_side
mask_head       model has the segmentation head                          False
ema_decay       model is an EMAClassifier (evaluates the average)        0.0
=============== ======================================================== ==========================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .augment import EvalPipeline
from .cache import square_uint8
from .errors import CheckpointError
from .models import build_model, head_prefix, wrap_classifier
from .transforms import Transform, default_resize, eval_transform

__all__ = ["CheckpointError", "inference_config", "clean_state_dict", "load_pretrained", "load_for_inference"]

log = logging.getLogger(__name__)


def inference_config(
    model_name: str,
    class_names: Sequence[str],
    dropout: float = 0.0,
    image_size: int = 224,
    resize_size: int | None = None,
) -> dict[str, Any]:
    """The keys `load_for_inference` needs; merge them into the config dict passed to `hvdtrain.fit`."""
    return {
        "model_name": model_name,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "dropout": float(dropout),
        "image_size": int(image_size),
        "resize_size": int(resize_size or default_resize(image_size)),
    }


def clean_state_dict(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Strip `module.` (DDP/DataParallel) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _read(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad file; all mean "unusable"
        raise CheckpointError(f"cannot load {what} {p}: {e}") from e


def load_pretrained(model: nn.Module, name: str, path: str | Path) -> bool:
    """Load a local weights file into `model` (built by `build_model(name, ...)`); nothing is downloaded.

    Accepts a torchvision state dict (e.g. `resnet18-f37072fd.pth`, head `fc.*` / `classifier.1.*`), or a
    checkpoint dict with a `model` or `state_dict` entry (this suite's `best.pt`). The backbone must match
    exactly; the head is loaded when its class count matches the model's and left freshly initialised otherwise.

    Returns:
        True when the head was loaded too.

    Raises:
        FileNotFoundError, CheckpointError: missing, unreadable or mismatching file (names the file and keys).
    """
    sd = _read(path, "weights file")
    if isinstance(sd, dict):
        for key in ("model", "state_dict"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    sd = clean_state_dict(sd)
    head = head_prefix(name)
    if name.startswith("resnet"):  # torchvision's ResNet head is a bare `fc`; ours is Sequential(dropout, fc)
        sd = {("fc.1." + k[3:] if k.startswith("fc.") and not k.startswith("fc.1.") else k): v for k, v in sd.items()}
    own = model.state_dict()
    file_backbone = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
    own_backbone = {k for k in own if not k.startswith(head + ".")}
    missing, unexpected = sorted(own_backbone - set(file_backbone)), sorted(set(file_backbone) - own_backbone)
    if missing or unexpected:
        raise CheckpointError(
            f"weights file {path} does not fit {name}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in file_backbone.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"weights file {path} does not fit {name}: shape mismatch in {bad[:5]}")
    file_head = {k: v for k, v in sd.items() if k.startswith(head + ".")}
    head_fits = set(file_head) == {k for k in own if k.startswith(head + ".")} and all(
        v.shape == own[k].shape for k, v in file_head.items()
    )
    model.load_state_dict({**own, **file_backbone, **(file_head if head_fits else {})}, strict=True)
    if not head_fits:
        w = file_head.get(head + ".weight")
        log.info(
            "%s: backbone loaded; head replaced (file has %s outputs, the model %d)",
            path,
            None if w is None else w.shape[0],
            own[head + ".weight"].shape[0],
        )
    return head_fits


def load_for_inference(
    checkpoint_path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, list[str], Transform]:
    """Rebuild a trained classifier from a contract checkpoint (`best.pt`, `last.pt`).

    Returns:
        (model in eval mode on `device`, class names in label order, the evaluation transform PIL -> tensor).

    Raises:
        FileNotFoundError, CheckpointError: missing file, missing config keys or weights that do not fit.
    """
    ckpt = _read(checkpoint_path, "checkpoint")
    if (
        not isinstance(ckpt, dict)
        or not isinstance(ckpt.get("model"), dict)
        or not isinstance(ckpt.get("config"), dict)
    ):
        raise CheckpointError(f"checkpoint {checkpoint_path} lacks the 'model' state dict or the 'config' dict")
    cfg = ckpt["config"]
    name = cfg.get("model_name") or cfg.get("model")
    class_names = cfg.get("class_names")
    if not name or not class_names:
        raise CheckpointError(
            f"checkpoint {checkpoint_path}: config needs 'model_name' and 'class_names' (found keys {sorted(cfg)})"
        )
    num_classes = int(cfg.get("num_classes", len(class_names)))
    if num_classes != len(class_names):
        raise CheckpointError(
            f"checkpoint {checkpoint_path}: num_classes {num_classes} but {len(class_names)} class names"
        )
    net = build_model(name, num_classes, float(cfg.get("dropout", 0.0)))
    model = wrap_classifier(net, bool(cfg.get("mask_head", False)), float(cfg.get("ema_decay", 0.0)))
    try:
        model.load_state_dict(clean_state_dict(ckpt["model"]), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {checkpoint_path}: weights do not fit {name}: {e}") from e
    image_size = int(cfg.get("image_size", 224))
    if cfg.get("resize_mode", "short_side") == "square":
        transform: Transform = SquareTransform(image_size, int(cfg.get("resize_size") or default_resize(image_size)))
    else:
        transform = eval_transform(image_size, cfg.get("resize_size"))
    return model.to(device).eval(), list(class_names), transform


class SquareTransform:
    """PIL RGB -> the cached pipeline's evaluation tensor: resize to `side` x `side`, centre crop, normalise."""

    def __init__(self, image_size: int, side: int) -> None:
        self.side, self.pipeline = side, EvalPipeline(image_size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        image = torch.from_numpy(square_uint8(img, self.side).copy()).permute(2, 0, 1)
        return self.pipeline(image, torch.zeros((1, self.side, self.side), dtype=torch.uint8))[0]
