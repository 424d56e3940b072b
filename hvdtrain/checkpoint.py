"""Atomic rank-0 checkpoints, the newest-checkpoint search, and loading on every rank."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import dist
from .atomic import write_atomic, write_text_atomic
from .errors import CheckpointError
from .run import RunPaths

__all__ = [
    "unwrap",
    "save",
    "find_latest",
    "load",
    "load_on_all_ranks",
    "rng_state",
    "set_rng_state",
    "CheckpointError",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module behind DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def rng_state() -> dict[str, Any]:
    """This rank's RNG states, as tensors and plain types so `weights_only=True` can load them."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *map(int, np_state[2:4]),
            float(np_state[4]),
        ],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically, with a readable `<name>.meta.json` beside it. Call on rank 0."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    meta = {k: state[k] for k in ("epoch", "step", "best_metric") if k in state}
    meta["file"] = path.name
    write_text_atomic(path.with_suffix(".meta.json"), json.dumps(meta, indent=1))


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint in `run_dir/checkpoints` with the highest optimizer step (newest file on a tie)."""
    best: tuple[int, float, Path] | None = None
    for meta_file in RunPaths(run_dir).checkpoints.glob("*.meta.json"):
        ckpt = meta_file.with_name(meta_file.name.removesuffix(".meta.json") + ".pt")
        try:
            step = int(json.loads(meta_file.read_text())["step"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue  # a meta file we cannot read: not a candidate
        if ckpt.is_file():
            key = (step, ckpt.stat().st_mtime, ckpt)
            best = key if best is None or key[:2] > best[:2] else best
    return best[2] if best else None


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with `weights_only=True` (no arbitrary code from pickles)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for truncated or foreign files
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e


def load_on_all_ranks(path: Path | None) -> dict[str, Any] | None:
    """Rank 0 reads `path`; every rank gets the same state (the file need not be visible to other nodes)."""
    state = load(path) if dist.is_main() and path is not None else None
    return dist.broadcast_object(state, root=0)
