"""Reading training run folders (docs/CONTRACT.md: config.json, metrics.jsonl, summary.json) for the scaling report."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .perfmodel import Measurement

__all__ = [
    "RunFolderError",
    "RunRecord",
    "expand_run_dirs",
    "grad_bytes_from_checkpoint",
    "load_run",
    "measurement",
    "small_allreduces_per_step",
]

# hvdtrain.RunPaths' names, spelled here so that reading run folders needs no torch (importing hvdtrain loads it).
_RUN_FILES = ("summary.json", "metrics.jsonl", "config.json")
_NOT_GRADIENTS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm buffers in the state dict


class RunFolderError(FileNotFoundError):
    """A run folder, or a file the report needs in it, is missing."""


@dataclass(frozen=True)
class RunRecord:
    """What the scaling report needs from one run folder. Times are per training epoch (means over epochs)."""

    path: Path
    world_size: int  # Horovod ranks
    simulate_gpus: int  # GPUs each rank stands in for through gradient accumulation
    batch_size_per_gpu: int
    accum: int
    global_batch: int
    epoch_time_s: float | None  # training wall time per epoch
    comm_s: float | None  # time per epoch waiting for the allreduce
    samples_per_epoch: float | None
    comm_fraction: float | None
    metric: str  # the validation key read as "Dice"
    val: list[tuple[int, float]] = field(default_factory=list)  # (epoch, value) in epoch order
    grad_bytes: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def gpus(self) -> int:
        """Effective GPUs: world size x simulated GPUs per rank."""
        return self.world_size * self.simulate_gpus

    @property
    def kind(self) -> str:
        """'real' for Horovod ranks only, 'simulated' when gradient accumulation stands in for more GPUs."""
        return "simulated" if self.simulate_gpus > 1 else "real"

    @property
    def scaling(self) -> str:
        """'weak' (batch per GPU fixed) or 'strong' (a fixed --global-batch), as hvdtrain.loop.fit recorded it."""
        return str(self.summary.get("scaling") or self.config.get("scaling") or "weak")

    @property
    def steps_per_epoch(self) -> float | None:
        return self.samples_per_epoch / self.global_batch if self.samples_per_epoch else None

    @property
    def best(self) -> float | None:
        """Best validation value of `metric` (max, or min for a loss)."""
        if not self.val:
            return None
        values = [v for _, v in self.val]
        return min(values) if "loss" in self.metric else max(values)

    def epochs_to(self, target: float) -> int | None:
        """Epochs trained when the validation value first reached `target` (epoch index + 1), None if never."""
        for epoch, v in self.val:
            if (v <= target) if "loss" in self.metric else (v >= target):
                return epoch + 1
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: not valid JSON ({e})") from e
    return records


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Each path as a run folder, or, for a folder that is not one itself, the run folders directly inside it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not any((p / f).exists() for f in _RUN_FILES):
            children = sorted(c for c in p.iterdir() if c.is_dir() and any((c / f).exists() for f in _RUN_FILES))
            if children:
                out.extend(children)
                continue
        out.append(p)
    return out


def load_run(path: str | Path, metric: str = "dice") -> RunRecord:
    """Read one run folder.

    Args:
        path: the run folder.
        metric: the validation key to report as Dice; when no validation record has it, the run's monitored
            metric (summary.json `monitor`) is used instead.

    Raises:
        RunFolderError: the folder, its summary.json or its metrics.jsonl is missing (the message names the folder).
        ValueError: unreadable JSON, a summary without `world_size`, or no validation values at all.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"run folder {path} does not exist")
    for name in ("summary.json", "metrics.jsonl"):
        if not (path / name).is_file():
            raise RunFolderError(
                f"run folder {path} has no {name}: the run did not finish (or was preempted), or this is not a run "
                "folder (see docs/CONTRACT.md)"
            )
    summary = _read_json(path / "summary.json")
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    records = _read_jsonl(path / "metrics.jsonl")
    get = lambda k, default=None: summary.get(k, config.get(k, default))  # summary first: it is what ran
    if get("world_size") is None:
        raise ValueError(f"{path / 'summary.json'}: no 'world_size' (written by hvdtrain.loop.fit)")
    world_size, sim = int(get("world_size")), int(get("simulate_gpus", 1) or 1)
    if summary.get("gpus") is not None and int(summary["gpus"]) != world_size * sim:
        raise ValueError(
            f"{path / 'summary.json'}: gpus {summary['gpus']} is not world_size {world_size} x simulate_gpus {sim}"
        )
    # A resumed run may repeat an epoch's line: the last one wins.
    train = {r["epoch"]: r for r in records if r.get("split") == "train" and "epoch" in r}
    val = {r["epoch"]: r for r in records if r.get("split") == "val" and "epoch" in r}
    key = metric
    if not any(isinstance(r.get(key), (int, float)) for r in val.values()):
        key = summary.get("monitor") or metric
    curve = [(int(e), float(r[key])) for e, r in sorted(val.items()) if isinstance(r.get(key), (int, float))]
    if not curve:
        raise ValueError(
            f"{path / 'metrics.jsonl'}: no validation values of {metric!r}"
            + (f" or of the monitored {key!r}" if key != metric else "")
        )
    batch, accum = int(get("batch_size_per_gpu", 0) or 0), int(get("accum", 1) or 1)
    global_batch = int(get("global_batch", 0) or batch * accum * world_size * sim)
    epoch_time = summary.get("epoch_time_s")
    if epoch_time is None:
        epoch_time = _mean([r.get("time_s") for r in train.values()])
    grad_bytes = get("grad_bytes")
    return RunRecord(
        path=path,
        world_size=world_size,
        simulate_gpus=sim,
        batch_size_per_gpu=batch,
        accum=accum,
        global_batch=global_batch,
        epoch_time_s=epoch_time,
        comm_s=_mean([r.get("comm_s") for r in train.values()]),
        samples_per_epoch=_mean([r.get("samples") for r in train.values()]),
        comm_fraction=summary.get("comm_fraction"),
        metric=key,
        val=curve,
        grad_bytes=float(grad_bytes) if grad_bytes is not None else None,
        config=config,
        summary=summary,
    )


def grad_bytes_from_checkpoint(run: RunRecord) -> float | None:
    """Gradient bytes from the run's checkpoint: floating-point state-dict tensors, BatchNorm statistics excluded.

    An estimate (frozen parameters would count too); None when the run has no checkpoint.
    """
    for name in ("last.pt", "best.pt"):
        path = run.path / "checkpoints" / name
        if path.is_file():
            import torch  # only here: the rest of the report does not need torch

            state = torch.load(path, map_location="cpu", weights_only=True).get("model", {})
            return float(
                sum(
                    t.numel() * t.element_size()
                    for k, t in state.items()
                    if t.is_floating_point() and not k.endswith(_NOT_GRADIENTS)
                )
            )
    return None


def small_allreduces_per_step(config: dict[str, Any]) -> float:
    """Latency-bound collectives per optimizer step besides the gradients, from a run's config.

    hvdtrain.loop.step_flags allreduces the preemption/NaN flags once per step; with a global-batch Dice
    (`batch_dice` and `global_dice`, segmentation.losses) every micro-batch sums tp/fp/fn over the ranks in forward
    and again in backward, once per loss head (1 + the lower decoder levels with `deep_supervision`).
    """
    n = 1.0
    if config.get("batch_dice") and config.get("global_dice"):
        heads = int(config.get("depth", 1) or 1) if config.get("deep_supervision") else 1
        micro = int(config.get("accum", 1) or 1) * int(config.get("simulate_gpus", 1) or 1)
        n += 2.0 * heads * micro
    return n


def measurement(run: RunRecord, grad_bytes: float) -> Measurement:
    """The calibration input of a real run.

    Raises:
        ValueError: the run is simulated or lacks epoch time, comm time or samples per epoch.
    """
    if run.kind != "real":
        raise ValueError(f"run folder {run.path}: a simulated run's timing does not measure communication")
    if run.epoch_time_s is None or run.comm_s is None or not run.steps_per_epoch:
        raise ValueError(f"run folder {run.path}: metrics.jsonl has no train time_s/comm_s/samples to calibrate with")
    return Measurement(
        run.world_size,
        run.steps_per_epoch,
        run.epoch_time_s,
        run.comm_s,
        grad_bytes,
        run.name,
        samples_per_step=run.batch_size_per_gpu * run.accum or None,
        accum=max(int(run.accum or 1), 1),
        small_allreduces=small_allreduces_per_step({**run.config, **run.summary}),
    )
