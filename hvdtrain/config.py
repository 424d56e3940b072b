"""Frozen dataclass configs turned into `--kebab-case` flags, loadable from a YAML preset.

Precedence: dataclass defaults < `--config FILE.yaml` < command-line flags. The whole config is saved as
`config.json` in the run folder and inside every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

__all__ = ["arg", "TrainConfig", "parse_config", "load_yaml", "to_dict", "ConfigError"]

C = TypeVar("C")


def arg(default: Any, help: str, choices: tuple | None = None) -> Any:  # mirrors argparse
    """A dataclass field with its --help text (and allowed values)."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Fields every trainer shares; job configs subclass it."""

    run_dir: str = arg("runs/run", "run folder: config.json, metrics.jsonl, checkpoints/, tb/")
    resume: bool = arg(False, "resume from the newest checkpoint in --run-dir (a fresh start when there is none)")
    epochs: int = arg(10, "training epochs")
    batch_size_per_gpu: int = arg(2, "samples per rank per micro-batch (with --global-batch: the most that fits)")
    accum: int = arg(1, "micro-batches accumulated per optimizer step (Horovod backward_passes_per_step)")
    simulate_gpus: int = arg(1, "reproduce an N-GPU run on each rank through N x accumulation (same global batch)")
    fuse_simulated: bool = arg(
        False, "forward a step's simulated GPUs as one batch: faster, equal to real ranks up to rounding (no BatchNorm)"
    )
    global_batch: int | None = arg(None, "strong scaling: this global batch at any GPU count (LR not scaled)")
    lr: float = arg(1e-3, "base learning rate, for one GPU's batch; scaled by --lr-rule")
    lr_rule: str = arg("linear", "LR scaling in GPUs x accumulation", ("none", "linear", "sqrt"))
    warmup_epochs: float = arg(1.0, "ramp from the base LR to the scaled LR over this many epochs")
    lr_table: tuple[str, ...] = arg(
        (), "batch -> (peak LR, warmup) rows G:LR:WARMUP, or a YAML of them: replace --lr-rule and --warmup-epochs"
    )
    schedule: str = arg("cosine", "LR schedule after warmup", ("cosine", "step", "plateau", "poly", "constant"))
    min_lr_ratio: float = arg(0.0, "cosine/poly floor as a fraction of the peak LR")
    step_epochs: int = arg(30, "step schedule: decay every this many epochs")
    step_gamma: float = arg(0.1, "step/plateau schedule: decay factor")
    plateau_patience: int = arg(5, "plateau schedule: epochs without improvement before decaying")
    plateau_monitor: str = arg("", "plateau schedule: validation value it watches (default: the best-checkpoint one)")
    poly_power: float = arg(0.9, "poly schedule exponent (nnU-Net uses 0.9)")
    optimizer: str = arg("adamw", "optimizer", ("sgd", "adamw", "lamb", "lars"))
    momentum: float = arg(0.9, "SGD/LARS momentum")
    weight_decay: float = arg(1e-4, "weight decay")
    clip_grad: float = arg(0.0, "clip the global gradient norm to this (0: off)")
    amp: str = arg("auto", "mixed precision: auto = bf16 on GPU, fp32 on CPU", ("auto", "bf16", "fp16", "off"))
    fp16_allreduce: bool = arg(False, "compress gradients to fp16 for the allreduce")
    adasum: bool = arg(False, "Adasum reduction instead of averaging (LR is then not scaled by GPUs)")
    sync_bn: bool = arg(False, "SyncBatchNorm: batch-norm statistics over all ranks' micro-batches (no-op on 1 rank)")
    seed: int = arg(0, "seed for initialisation, shuffling and augmentation")
    threads: int = arg(0, "torch threads per rank (0: cores / ranks on the node)")
    num_workers: int = arg(0, "data-loader worker processes per rank")
    channels_last: bool = arg(False, "channels-last memory format (channels_last_3d for 3D models): faster GPU convs")
    cudnn_benchmark: bool = arg(True, "let cuDNN time and pick conv algorithms (fixed patch sizes; GPU only)")
    eval_every: int = arg(1, "validate every this many epochs (and at the last)")
    progress: bool = arg(True, "progress bar on rank 0")
    preempt_at_step: int = arg(0, "act as if the preemption signal came at this optimizer step (tests, drills)")
    stall_timeout: float = arg(900.0, "exit 75 when no step or evaluation completes for this many seconds (0: off)")

    @property
    def micro_per_step(self) -> int:
        """Micro-batches per optimizer step on a rank: accumulation x simulated GPUs."""
        return self.accum * self.simulate_gpus


def _base_type(tp: Any) -> Any:
    """int | None -> int; keeps list[...] / tuple[...]."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text, **kw)
            continue
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            kw["nargs"] = "+"
            tp = typing.get_args(tp)[0]
        parser.add_argument(flag, type=tp, choices=f.metadata.get("choices"), help=help_text, **kw)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML preset as a flat dict of field names (kebab or snake case)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of field: value, found {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _build(cls: type[C], values: dict[str, Any], source: str) -> C:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    clean = {}
    for k, v in values.items():
        tp = _base_type(hints[k])
        if typing.get_origin(tp) in (list, tuple) and isinstance(v, list):
            v = typing.get_origin(tp)(v)
        elif tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        choices = names[k].metadata.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"{source}: {k}={v!r} is not one of {', '.join(map(str, choices))}")
        clean[k] = v
    return cls(**clean)


def parse_config(cls: type[C], argv: list[str] | None = None, description: str = "") -> C:
    """Build `cls` from defaults, an optional `--config` YAML and flags; exits with a clear message on error."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", help="YAML preset of field: value (flags given here override it)")
    _add_arguments(parser, cls)
    ns = vars(parser.parse_args(argv))
    config_path = ns.pop("config", None)
    values: dict[str, Any] = {}
    try:
        if config_path:
            values.update(load_yaml(config_path))
            _build(cls, values, f"config file {config_path}")  # report bad file fields before flags mask them
        values.update(ns)
        return _build(cls, values, "configuration")
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
