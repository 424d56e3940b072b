"""Safe `--resume`: the checkpoint must fit the run it continues, and a new world size is remapped.

Config keys fall in three groups. SHAPE_OR_TASK keys (the model's architecture, the classes, the data split, the
preprocessing, the optimizer whose state is restored, the monitored value) may not change: a change is a
`ResumeMismatchError` listing every differing key, before any weight is loaded. Keys that only steer the rest of
the run (epochs, LR and schedule, threads, batch, paths, ...) may change; they are printed. Whatever the config
says, the checkpoint's parameters must match the model's names and shapes.

A different world size is allowed: the position inside the interrupted epoch is remapped from micro-batches per
rank to samples seen (the data order is one global permutation at every size, `hvdtrain.data`), so no sample is
trained twice or skipped; when the samples seen do not fill whole steps at the new size the epoch restarts. Dropout
and augmentation streams follow from the position in the run (`hvdtrain.seeding`); each rank's saved global RNG
state (for any other draw) is restored only when the size matches (there is none for a new rank).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import dist
from .checkpoint import CheckpointError

__all__ = [
    "SHAPE_OR_TASK",
    "ResumeMismatchError",
    "config_changes",
    "check_model",
    "remap_position",
    "check",
    "adapt_position",
]

#: config keys that a resumed run may not change (absent keys are ignored: each job has its own)
SHAPE_OR_TASK = frozenset(
    {
        "model",  # U-Net: the constructor arguments; classifier: the architecture's name
        "features",
        "depth",
        "norm",
        "deep_supervision",
        "width",
        "classes",
        "task",
        "optimizer",  # its saved state (moments, momentum) only fits the same optimizer
        "monitor",  # best_metric would compare different quantities
        "preprocess",
        "target_spacing",
        "window",
        "normalize",
        "image_size",
        "folds",
        "fold",
        "split_seed",
        "val_fraction",
        "test_fraction",
        "grad_bytes",  # derived from the parameter shapes
    }
)

#: keys the loop adds to the saved config; compared through the world-size remapping, not here
_DERIVED = frozenset({"world_size", "gpus", "global_batch", "scaling", "peak_lr", "resume", "run_dir"})


class ResumeMismatchError(CheckpointError):
    """A checkpoint whose model or task differs from the run that would resume it."""


def config_changes(saved: dict[str, Any], current: dict[str, Any], source: str) -> list[str]:
    """The allowed changes as 'key: old -> new' lines; raises ResumeMismatchError for shape/task keys."""
    keys = sorted((set(saved) | set(current)) - _DERIVED)
    differ = [k for k in keys if k in saved and k in current and saved[k] != current[k]]
    bad = [k for k in differ if k in SHAPE_OR_TASK]
    if bad:
        lines = "\n".join(f"  {k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in bad)
        raise ResumeMismatchError(
            f"cannot resume from {source}: the model or task differs in {', '.join(bad)}:\n{lines}\n"
            "Resume with the checkpoint's values, or start a new run in another --run-dir."
        )
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in differ]


def check_model(saved: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise ResumeMismatchError naming missing, unexpected and reshaped parameters (not torch's raw error)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    reshaped = [
        f"{k} {tuple(saved[k].shape)} -> {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(saved))
        if tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape checkpoint -> model", reshaped))
        if items
    ]
    if problems:
        detail = "; ".join(problems)
        raise ResumeMismatchError(f"cannot resume from {source}: its weights don't fit the model: {detail}.")


def remap_position(
    batch_in_epoch: int, old_size: int, new_size: int, micro: int, steps_per_epoch: int, epoch: int
) -> tuple[int, int | None, str]:
    """(micro-batches per rank already trained in `epoch`, optimizer steps taken or None when unchanged, a note).

    Assumes the per-rank micro-batch and accumulation are unchanged (the global batch then scales with the size).
    """
    if old_size == new_size:
        return batch_in_epoch, None, ""
    seen = batch_in_epoch * old_size  # micro-batches of the global order already trained
    if seen % (new_size * micro):
        note = f"the {seen} micro-batches seen of epoch {epoch} are no whole steps at {new_size} ranks: it restarts"
        batch = 0
    else:
        batch = seen // new_size
        note = f"epoch {epoch} continues after {seen} micro-batches ({batch} per rank)" if batch else ""
    return batch, epoch * steps_per_epoch + batch // micro, note


def check(ckpt: dict[str, Any], config: dict[str, Any], model: nn.Module, source: str) -> None:
    """Every check before a checkpoint is restored into `model`; prints the allowed config changes (rank 0)."""
    changes = config_changes(ckpt.get("config") or {}, config, source)
    check_model(ckpt["model"], model, source)
    if changes:
        dist.print0(f"resuming {source} with changed settings: " + "; ".join(changes))


def adapt_position(
    state: Any, ckpt: dict[str, Any], micro: int, steps_per_epoch: int, batch_size_per_gpu: int | None = None
) -> None:
    """Remap `state` (a restored `loop.TrainState`) when the world size or per-GPU batch differs from the checkpoint's.

    A new per-GPU batch (strong scaling on another GPU count: `hvdtrain.batching`) counts the micro-batches trained
    in units of the new one first, so the remapping stays one of samples seen.
    """
    saved = ckpt.get("config") or {}
    old = int(saved.get("world_size", len(ckpt.get("rng", [])) or 1))
    new = dist.info().size
    old_b = int(saved.get("batch_size_per_gpu", batch_size_per_gpu or 1))
    new_b = batch_size_per_gpu or old_b
    if old == new and old_b == new_b:
        return
    batch = state.batch_in_epoch * old_b // new_b if state.batch_in_epoch * old_b % new_b == 0 else 0
    if old == new:  # remap_position changes nothing at the same size: check the whole steps here
        batch = batch if batch % micro == 0 else 0
        state.batch_in_epoch, state.step = batch, state.epoch * steps_per_epoch + batch // micro
        dist.print0(
            f"resuming with {new_b} instead of {old_b} samples per GPU: epoch {state.epoch} at step {state.step}"
        )
        return
    batch, step, note = remap_position(batch, old, new, micro, steps_per_epoch, state.epoch)
    state.batch_in_epoch, state.step = batch, step
    dist.print0(
        f"resuming a {old}-rank run on {new} ranks: optimizer step {step} of the new schedule; dropout streams "
        f"continue per GPU from the seed, other RNG state (saved per rank for {old} ranks) does not"
        + (f"; {note}" if note else "")
    )
