"""Sliding-window inference with Gaussian importance blending (nnU-Net / MONAI `sliding_window_inference`).

Windows of `roi_size` step by `roi * (1 - overlap)` and are spread evenly so the last one ends at the border;
each window's output is weighted by a Gaussian (sigma = `sigma_scale * roi`, nnU-Net's 1/8) that trusts window
centres more than edges, and the weighted sum is divided by the summed weights. A volume smaller than the window
is padded (with `pad_value`) and the output cropped back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gaussian_importance", "window_starts", "sliding_window_inference", "predict_probabilities"]

ModelFn = Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]]  # a network's forward


def gaussian_importance(
    roi_size: Sequence[int], sigma_scale: float = 0.125, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Separable Gaussian weights of shape `roi_size`, maximum 1, never 0 (so every voxel gets a weight)."""
    w = torch.ones((), device=device)
    for n in roi_size:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        g = torch.exp(-0.5 * (x / max(sigma_scale * n, 1e-6)) ** 2)
        w = w[..., None] * g
    w = w / w.max()
    return w.clamp_min(1e-6)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices along one axis: evenly spread, first at 0, last at `size - roi`, step <= roi*(1-overlap)."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    n = math.ceil((size - roi) / step) + 1
    return sorted({int(round(i * (size - roi) / (n - 1))) for i in range(n)})


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Sequence[int],
    predictor: ModelFn,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    pad_value: float = 0.0,
    sw_device: torch.device | str | None = None,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run `predictor` on overlapping windows of `inputs` and blend the outputs.

    Args:
        inputs: `(B, C, *spatial)`.
        roi_size: window size per spatial axis.
        predictor: maps `(N, C, *roi_size)` to `(N, C_out, *roi_size)` (a list/tuple: its first element, as a
            deep-supervised U-Net returns in training mode).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        sw_batch_size: windows per predictor call.
        mode: "gaussian" or "constant" (plain average).
        sigma_scale: Gaussian sigma as a fraction of the window.
        pad_value: input value used where a volume is smaller than the window.
        sw_device: where windows are computed (default: the input's device).
        out_device: where the blended output is accumulated (default: the input's device; "cpu" keeps big
            volumes off the GPU).

    Returns:
        `(B, C_out, *spatial)` float32 on `out_device`.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    spatial = tuple(inputs.shape[2:])
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != len(spatial):
        raise ValueError(f"roi_size {roi} does not match the {len(spatial)} spatial axes of {tuple(inputs.shape)}")
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    out_device = torch.device(out_device) if out_device is not None else inputs.device
    # Pad small axes symmetrically up to the window; remember where the original volume sits.
    before = [max(r - s, 0) // 2 for s, r in zip(spatial, roi)]
    after = [max(r - s, 0) - b for s, r, b in zip(spatial, roi, before)]
    if any(before) or any(after):
        pads = [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)]
        inputs = F.pad(inputs, pads, mode="constant", value=pad_value)
    padded = tuple(inputs.shape[2:])
    starts = list(itertools.product(*[window_starts(s, r, overlap) for s, r in zip(padded, roi)]))
    weight = (
        gaussian_importance(roi, sigma_scale, sw_device) if mode == "gaussian" else torch.ones(roi, device=sw_device)
    )
    results = []
    for b in range(inputs.shape[0]):
        out = norm = None
        for i in range(0, len(starts), sw_batch_size):
            chunk = starts[i : i + sw_batch_size]
            slices = [tuple(slice(s, s + r) for s, r in zip(st, roi)) for st in chunk]
            windows = torch.stack([inputs[b][(slice(None), *sl)] for sl in slices]).to(sw_device)
            pred = predictor(windows)
            if isinstance(pred, (list, tuple)):
                pred = pred[0]
            pred = pred.float() * weight
            if out is None:
                out = torch.zeros((pred.shape[1], *padded), dtype=torch.float32, device=out_device)
                norm = torch.zeros(padded, dtype=torch.float32, device=out_device)
            w_out = weight.to(out_device)
            for k, sl in enumerate(slices):
                out[(slice(None), *sl)] += pred[k].to(out_device)
                norm[sl] += w_out
        crop = tuple(slice(b0, b0 + s) for b0, s in zip(before, spatial))
        results.append((out / norm)[(slice(None), *crop)])
    return torch.stack(results)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    activation: str = "sigmoid",
    device: torch.device | str = "cpu",
    pad_value: float = 0.0,
    tta_flips: Sequence[int] = (),
) -> np.ndarray:
    """Foreground probabilities of one preprocessed volume.

    Args:
        model: a segmentation network in eval mode (logits out).
        image: `(X, Y, Z)`, `(1, X, Y, Z)` or `(1, 1, X, Y, Z)`.
        activation: "sigmoid" (1 output channel) or "softmax" (probability of class 1 vs the rest: 1 - p(bg)).
        tta_flips: spatial axes (0, 1, 2 = X, Y, Z) to mirror for test-time augmentation: the probabilities of
            every combination of flips (2**len(tta_flips) passes) are averaged, each flipped back first.

    Returns:
        `(X, Y, Z)` float32 numpy probabilities; windows run on `device`, blending happens on the CPU.
    """
    x = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image, dtype=torch.float32)
    while x.ndim < 5:
        x = x[None]

    def predictor(w: torch.Tensor) -> torch.Tensor:
        logits = model(w)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits
        logits = logits.float()
        return torch.sigmoid(logits) if activation == "sigmoid" else 1 - torch.softmax(logits, 1)[:, :1]

    combos = [
        [2 + a for a, on in zip(tta_flips, bits) if on] for bits in itertools.product((0, 1), repeat=len(tta_flips))
    ]
    total = None
    for dims in combos:  # each pass predicts the mirrored volume; mirror it back before averaging
        xi = x.flip(dims) if dims else x
        prob = sliding_window_inference(
            xi, roi_size, predictor, overlap, sw_batch_size, pad_value=pad_value, sw_device=device, out_device="cpu"
        )
        prob = prob.flip(dims) if dims else prob
        total = prob if total is None else total + prob
    return (total / len(combos))[0, 0].numpy()
