"""GPU fast paths that change how the same computation runs, never what it computes.

* channels-last memory format (`channels_last` for 2D models, `channels_last_3d` for 3D ones): cuDNN's fastest
  tensor-core convolutions want NHWC/NDHWC; a model whose weights are channels-last makes its convolutions
  produce channels-last outputs whatever the input's layout, so converting the model is enough.
* `torch.backends.cudnn.benchmark`: cuDNN times its algorithms once per input shape and keeps the fastest; right
  for fixed patch/crop sizes, wasteful when every batch has a new shape (set `--no-cudnn-benchmark` then).
* pinned host memory and non-blocking copies: `hvdtrain.data` pins batches when a GPU is present, and the step
  functions copy with `non_blocking=True`; both are no-ops on the CPU.
* bf16 autocast: `hvdtrain.loop.autocast_dtype` (`--amp auto` is bf16 on GPUs that have it, fp32 on the CPU).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["memory_format_for", "prepare_model", "to_device"]


def memory_format_for(model: nn.Module) -> torch.memory_format:
    """`channels_last_3d` for a model with 3D convolutions, `channels_last` for 2D ones, else contiguous."""
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if any(m.weight.dim() == 5 for m in convs):
        return torch.channels_last_3d
    if any(m.weight.dim() == 4 for m in convs):
        return torch.channels_last
    return torch.contiguous_format


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool, cudnn_benchmark: bool) -> nn.Module:
    """Move `model` to `device` (in place, as `Module.to` does) in the chosen memory format; returns it.

    cudnn.benchmark is process-wide and only set on a CUDA device (it means nothing on the CPU).
    """
    fmt = memory_format_for(model) if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return model


def to_device(x: torch.Tensor, device: torch.device, memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """Copy a batch tensor to `device` without blocking the host (overlaps with compute when it is pinned)."""
    x = x.to(device, non_blocking=True)
    if memory_format is not None and x.dim() == {torch.channels_last: 4, torch.channels_last_3d: 5}.get(memory_format):
        x = x.contiguous(memory_format=memory_format)
    return x
