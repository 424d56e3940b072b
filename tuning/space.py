"""Search spaces: a YAML file of config fields to search, checked against the task's config dataclass.

    lr:                 {type: log-float, low: 1.0e-4, high: 1.0e-2}
    weight_decay:       {type: float, low: 0.0, high: 0.1}          # also `log: true`, `step: 0.01`
    batch_size_per_gpu: {type: int, low: 2, high: 8, step: 2}       # also `log: true`
    optimizer:          {type: categorical, choices: [adamw, sgd]}

Every key is a field of the trainer's config (`UNetConfig`, `ClassifierConfig`), so a trial's parameters are
config values as they are and the best ones can be written back as a `--config` YAML. Numbers may be written as
YAML 1.1 reads them (`1e-4` is a string there; it is accepted). Bad spaces raise `SpaceError` naming the source,
the parameter and the problem.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from .errors import TuningError

__all__ = [
    "SpaceError",
    "Param",
    "SearchSpace",
    "DEFAULT_SPACES",
    "NOT_SEARCHABLE",
    "parse_space",
    "load_space",
    "default_space",
    "apply_params",
]

# Fields that decide what or where a run is, not how it learns: searching them would change the question.
NOT_SEARCHABLE = frozenset(
    {
        "run_dir", "resume", "data", "cache_dir", "preempt_at_step", "progress", "threads", "num_workers",
        "eval_every", "monitor", "simulate_gpus", "fold", "folds", "split_seed", "test_fraction", "classes",
        "skip_bad", "weights", "val_fraction", "dedup_threshold",
    }
)  # fmt: skip

_KINDS = {"float": ("float", False), "log-float": ("float", True), "logfloat": ("float", True), "int": ("int", False)}
_KINDS["categorical"] = ("categorical", False)
_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"}}
_KEYS["categorical"] = {"type", "choices"}

# Defaults per task: the hyper-parameters that move the result most for these recipes, in ranges that train.
DEFAULT_SPACES: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {
        "lr": {"type": "log-float", "low": 1e-4, "high": 1e-2},
        "weight_decay": {"type": "log-float", "low": 1e-6, "high": 1e-3},
        "fg_share": {"type": "float", "low": 0.2, "high": 0.8},
        "ce_weight": {"type": "float", "low": 0.0, "high": 2.0},
        "dropout": {"type": "float", "low": 0.0, "high": 0.3},
    },
    "classifier": {
        "lr": {"type": "log-float", "low": 1e-4, "high": 3e-2},
        "weight_decay": {"type": "log-float", "low": 1e-6, "high": 1e-2},
        "dropout": {"type": "float", "low": 0.0, "high": 0.6},
        "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
        "batch_size_per_gpu": {"type": "categorical", "choices": [8, 16, 32]},
    },
}


class SpaceError(TuningError):
    """A search space that cannot be used; the message names the source and the parameter."""


@dataclass(frozen=True)
class Param:
    """One searched config field."""

    name: str
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.CategoricalDistribution(self.choices)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (what `parse_space` reads back)."""
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out: dict[str, Any] = {"type": "log-float" if self.kind == "float" and self.log else self.kind}
        out.update(low=self.low, high=self.high)
        if self.kind == "int" and self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {list(self.choices)}"
        scale = " (log)" if self.log else ""
        step = f" step {self.step}" if self.step is not None else ""
        return f"{self.name} {self.kind} [{self.low:g}, {self.high:g}]{scale}{step}"


@dataclass(frozen=True)
class SearchSpace:
    """The searched fields, in file order."""

    params: tuple[Param, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter on `trial` (a retried trial returns the values it already holds)."""
        return {p.name: p.suggest(trial) for p in self.params}

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {p.name: p.distribution() for p in self.params}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {p.name: p.to_dict() for p in self.params}

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.params)


def _unwrap_optional(tp: Any) -> Any:
    """`int | None` -> `int`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _field_types(config_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(config_cls)}


def _number(value: Any, what: str, integer: bool) -> float | int:
    """`value` as a number; YAML 1.1 reads `1e-4` as a string, so numeric strings are accepted."""
    if isinstance(value, bool) or value is None:
        raise SpaceError(f"{what} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise SpaceError(f"{what} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{what} must be a finite number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise SpaceError(f"{what} must be a whole number for an int parameter, got {value!r}")
        return int(value)
    return float(value)


def _check_field(
    name: str, kind: str, choices: tuple, field_type: Any, field_choices: tuple | None, where: str
) -> None:
    """The parameter's values must be valid for the config field they are written to."""
    origin = typing.get_origin(field_type)
    if origin in (list, tuple):
        raise SpaceError(f"{where}: {name} is a sequence field; fix it in the base config instead of searching it")
    if field_type is bool:
        ok = kind == "categorical" and all(isinstance(c, bool) for c in choices)
    elif field_type is str:
        ok = kind == "categorical" and all(isinstance(c, str) for c in choices)
    elif field_type is int:
        ok = kind == "int" or (kind == "categorical" and all(type(c) is int for c in choices))
    elif field_type is float:
        ok = kind in ("float", "int") or (
            kind == "categorical" and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)
        )
    else:
        ok = False
    if not ok:
        got = f"categorical {list(choices)}" if kind == "categorical" else kind
        tname = getattr(field_type, "__name__", str(field_type))
        raise SpaceError(f"{where}: {name} is a {tname} field of the config; a {got} parameter cannot set it")
    if field_choices and kind == "categorical":
        bad = [c for c in choices if c not in field_choices]
        if bad:
            raise SpaceError(f"{where}: {name} choices {bad} are not among the allowed {list(field_choices)}")


def _parse_param(name: str, spec: Any, fields: dict[str, Any], choices_of: dict[str, tuple | None], where: str):
    if name not in fields:
        raise SpaceError(f"{where}: {name!r} is not a field of the config (known: {', '.join(sorted(fields))})")
    if name in NOT_SEARCHABLE:
        raise SpaceError(f"{where}: {name} decides what or where the run is, not how it learns; it cannot be searched")
    if not isinstance(spec, Mapping):
        raise SpaceError(
            f"{where}: {name} must be a mapping such as {{type: float, low: 0.0, high: 1.0}}, got {spec!r}"
        )
    type_name = spec.get("type")
    if type_name not in _KINDS:
        raise SpaceError(f"{where}: {name} has type {type_name!r}; expected one of {', '.join(_KINDS)}")
    kind, log = _KINDS[type_name]
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise SpaceError(f"{where}: {name} ({type_name}) has unknown key(s) {', '.join(map(str, unknown))}")
    what = f"{where}: {name}"
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{what} needs a non-empty list of choices, got {choices!r}")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise SpaceError(f"{what} choices must be numbers, strings, booleans or null, got {choices!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise SpaceError(f"{what} has repeated choices {choices!r}")
        _check_field(name, kind, tuple(choices), fields[name], choices_of[name], where)
        return Param(name, kind, choices=tuple(choices))
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{what} ({type_name}) needs `{key}`")
    integer = kind == "int"
    low, high = _number(spec["low"], f"{what} low", integer), _number(spec["high"], f"{what} high", integer)
    if not low < high:
        raise SpaceError(f"{what}: low ({low}) must be below high ({high})")
    if not isinstance(spec.get("log", False), bool):
        raise SpaceError(f"{what}: log must be true or false, got {spec['log']!r}")
    log = spec.get("log", log)
    if log and low <= 0:
        raise SpaceError(f"{what}: a log scale needs low > 0, got {low}")
    step = None
    if spec.get("step") is not None:
        step = _number(spec["step"], f"{what} step", integer)
        if step <= 0:
            raise SpaceError(f"{what}: step must be positive, got {step}")
        if log:
            raise SpaceError(f"{what}: step and a log scale cannot be combined (Optuna does not support it)")
    _check_field(name, kind, (), fields[name], None, where)
    return Param(name, kind, low, high, log, step)


def parse_space(data: Any, config_cls: type, source: str = "search space") -> SearchSpace:
    """A `SearchSpace` from a mapping of field name -> spec (see the module docstring).

    Raises:
        SpaceError: empty or not a mapping, unknown fields or keys, bounds that do not make a range, values the
            config field cannot take.
    """
    if not isinstance(data, Mapping):
        raise SpaceError(f"{source} must be a mapping of config field -> spec, found {type(data).__name__}")
    if not data:
        raise SpaceError(f"{source} is empty: name at least one config field to search")
    fields = _field_types(config_cls)
    choices_of = {f.name: f.metadata.get("choices") for f in dataclasses.fields(config_cls)}
    params = []
    for raw_name, spec in data.items():
        name = str(raw_name).replace("-", "_")
        params.append(_parse_param(name, spec, fields, choices_of, source))
    return SearchSpace(tuple(params))


def load_space(path: str | Path, config_cls: type) -> SearchSpace:
    """Read and check a search-space YAML file."""
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"search space file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"search space file {p} is not valid YAML: {e}") from e
    return parse_space(data, config_cls, f"search space file {p}")


def default_space(task: str, config_cls: type) -> SearchSpace:
    """The built-in space of `task` (unet, classifier)."""
    if task not in DEFAULT_SPACES:
        raise SpaceError(f"no default search space for task {task!r}; known: {', '.join(DEFAULT_SPACES)}")
    return parse_space(DEFAULT_SPACES[task], config_cls, f"default {task} search space")


def apply_params(cfg: Any, params: Mapping[str, Any], **changes: Any) -> Any:
    """A copy of the frozen config `cfg` with `params` (and `changes`) set; ints become floats for float fields."""
    fields = _field_types(type(cfg))
    values = {}
    for name, value in {**params, **changes}.items():
        if name not in fields:
            raise SpaceError(f"{name!r} is not a field of {type(cfg).__name__}")
        if fields[name] is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[name] = value
    return dataclasses.replace(cfg, **values)
