"""Search spaces from YAML: the four kinds, the default spaces, and clear errors for spaces that cannot work."""

from __future__ import annotations

import optuna
import pytest

from classification.config import ClassifierConfig
from segmentation.config import UNetConfig
from tuning.space import SpaceError, apply_params, default_space, load_space, parse_space

GOOD = """
lr: {type: log-float, low: 1e-4, high: 1.0e-2}      # YAML 1.1 reads 1e-4 as a string: accepted
weight_decay: {type: float, low: 0, high: 0.1, step: 0.01}
batch_size_per_gpu: {type: int, low: 2, high: 8, step: 2}
optimizer: {type: categorical, choices: [adamw, sgd]}
augment: {type: categorical, choices: [true, false]}
"""


def test_parse_all_kinds_and_sample_them(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(GOOD)
    space = load_space(path, ClassifierConfig)
    assert space.names == ["lr", "weight_decay", "batch_size_per_gpu", "optimizer", "augment"]
    lr = space.params[0]
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-4, 1e-2, True)
    assert space.params[2].distribution() == optuna.distributions.IntDistribution(2, 8, step=2)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        p = space.suggest(study.ask())
        assert 1e-4 <= p["lr"] <= 1e-2 and p["batch_size_per_gpu"] in (2, 4, 6, 8)
        assert p["optimizer"] in ("adamw", "sgd") and p["augment"] in (True, False)
        assert round(p["weight_decay"] / 0.01, 6) == round(p["weight_decay"] / 0.01)
    # The YAML form round-trips.
    assert parse_space(space.to_dict(), ClassifierConfig) == space


@pytest.mark.parametrize("task,cls", [("unet", UNetConfig), ("classifier", ClassifierConfig)])
def test_default_spaces_parse_and_apply(task, cls):
    space = default_space(task, cls)
    assert "lr" in space.names
    params = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask())
    cfg = apply_params(cls(), params, run_dir="x")
    assert cfg.lr == params["lr"] and cfg.run_dir == "x"


def test_apply_params_turns_ints_into_floats_for_float_fields():
    cfg = apply_params(UNetConfig(), {"ce_weight": 1, "depth": 3})
    assert cfg.ce_weight == 1.0 and isinstance(cfg.ce_weight, float) and cfg.depth == 3
    with pytest.raises(SpaceError, match="not a field"):
        apply_params(UNetConfig(), {"nope": 1})


@pytest.mark.parametrize(
    "space,message",
    [
        ({"learning_rate": {"type": "float", "low": 0, "high": 1}}, "'learning_rate' is not a field"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "low .* must be below high"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.1}}, "must be below high"),
        ({"lr": {"type": "log-float", "low": 0, "high": 0.1}}, "log scale needs low > 0"),
        ({"lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True, "step": 0.01}}, "cannot be combined"),
        ({"lr": {"type": "uniform", "low": 0, "high": 1}}, "type 'uniform'"),
        ({"lr": {"low": 0, "high": 1}}, "type None"),
        ({"lr": {"type": "float", "low": 0}}, "needs `high`"),
        ({"lr": {"type": "float", "low": "small", "high": 1}}, "low must be a number"),
        ({"lr": {"type": "float", "low": 0, "high": 1, "lg": True}}, "unknown key"),
        ({"lr": {"type": "float", "low": 0, "high": 1, "step": -1}}, "step must be positive"),
        ({"lr": 0.01}, "must be a mapping"),
        ({"epochs": {"type": "int", "low": 1.5, "high": 4}}, "whole number"),
        ({"optimizer": {"type": "categorical", "choices": []}}, "non-empty list"),
        ({"optimizer": {"type": "categorical", "choices": ["adamw", "adam"]}}, r"\['adam'\] are not among"),
        ({"optimizer": {"type": "categorical", "choices": ["sgd", "sgd"]}}, "repeated"),
        ({"optimizer": {"type": "float", "low": 0, "high": 1}}, "str field"),
        ({"epochs": {"type": "float", "low": 1, "high": 4}}, "int field"),
        ({"batch_size_per_gpu": {"type": "categorical", "choices": [8, 16.5]}}, "int field"),
        ({"patch_size": {"type": "categorical", "choices": [1, 2]}}, "sequence field"),
        ({"run_dir": {"type": "categorical", "choices": ["a", "b"]}}, "cannot be searched"),
        ({"monitor": {"type": "categorical", "choices": ["dice"]}}, "cannot be searched"),
        ({}, "is empty"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_spaces_are_named(space, message):
    with pytest.raises(SpaceError, match=message):
        parse_space(space, UNetConfig, "space.yaml")


def test_bad_files(tmp_path):
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "missing.yaml", UNetConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: {type: float, low: [")
    with pytest.raises(SpaceError, match=f"{bad} is not valid YAML"):
        load_space(bad, UNetConfig)
    with pytest.raises(SpaceError, match="no default search space"):
        default_space("detector", UNetConfig)
