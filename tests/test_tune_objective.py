"""The worker loop on one rank with a stand-in task (no training): report, prune, fail, dedupe, stop, retry."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hvdtrain import dist
from segmentation.config import UNetConfig
from tuning.objective import RunOptions, config_fields, run_worker
from tuning.space import parse_space
from tuning.study import Worker, make_pruner, make_sampler, open_study
from tuning.tasks import Task


class FakeTask(Task):
    """Scores a config without training: Dice rises linearly over the epochs to `score(cfg)`."""

    name, config_cls = "unet", UNetConfig

    def __init__(self, score, fail=lambda cfg: False, preempt=lambda cfg: False):
        self.score, self.fail, self.preempt, self.seen = score, fail, preempt, []

    def monitor(self, cfg):
        return "dice", "max"

    def prepare(self, cfg, study_dir):
        return "fake"

    def train(self, cfg, on_epoch_end):
        self.seen.append(cfg)
        if self.fail(cfg):
            raise FloatingPointError("loss is nan at epoch 0, step 3")
        if self.preempt(cfg):
            return {"preempted": True}
        for epoch in range(cfg.epochs):
            on_epoch_end({"epoch": epoch, "split": "val", "dice": self.score(cfg) * (epoch + 1) / cfg.epochs})
        return {"best_metric": self.score(cfg), "gpus": 1, "world_size": 1, "global_batch": 2, "train_samples": 8}


LR = parse_space({"lr": {"type": "log-float", "low": 1e-5, "high": 1e-1}}, UNetConfig)


def _study(pruner="median", seed=0, startup=2):
    dist.init(threads=1)
    return open_study(
        "s",
        optuna.storages.InMemoryStorage(),
        make_sampler("tpe", seed, n_startup_trials=startup),
        make_pruner(pruner, 4, n_startup_trials=1),
        "maximize",
        {"task": "unet", "monitor": "dice"},
    )


def _run(task, study, tmp_path, space=LR, n_trials=6, **opts):
    cfg = UNetConfig(epochs=4, progress=False)
    return run_worker(task, cfg, space, RunOptions(n_trials, Path(tmp_path), **opts), study, Worker(0, "host:0"))


def test_trials_report_every_epoch_and_poor_ones_are_pruned(tmp_path):
    study = _study()
    task = FakeTask(lambda cfg: 1.0 - abs(cfg.lr - 0.01))  # best near lr = 0.01
    results = _run(task, study, tmp_path, n_trials=8)
    assert [r.number for r in results] == list(range(8))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) >= 2 and states.count(TrialState.PRUNED) >= 1
    for t, r in zip(study.trials, results):
        assert t.state.name == r.state and t.params == r.params
        assert t.user_attrs["config"]["lr"] == t.params["lr"] and t.user_attrs["worker"] == "host:0"
        if t.state == TrialState.PRUNED:  # stopped at the epoch it was judged
            assert len(t.intermediate_values) == r.epochs < 4
        else:
            assert sorted(t.intermediate_values) == [0, 1, 2, 3] and t.value == pytest.approx(r.value)
    assert study.best_trial.user_attrs["train_samples"] == 8


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    study = _study(pruner="none")
    results = _run(FakeTask(lambda cfg: cfg.lr, fail=lambda cfg: cfg.lr > 1e-3), study, tmp_path, n_trials=6)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and len(results) == 6
    assert all("FloatingPointError: loss is nan" in t.user_attrs["error"] for t in failed)
    assert all(t.params["lr"] > 1e-3 for t in failed)


def test_duplicate_draws_are_skipped_without_training(tmp_path, capsys):
    space = parse_space({"optimizer": {"type": "categorical", "choices": ["adamw", "sgd", "lamb"]}}, UNetConfig)
    study = _study(pruner="none", startup=10)
    task = FakeTask(lambda cfg: 0.5)
    _run(task, study, tmp_path, space=space, n_trials=3)
    trained = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["optimizer"] for t in trained) == ["adamw", "lamb", "sgd"]
    assert len(task.seen) == 3  # duplicates never reached training
    for t in study.trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs["duplicate_of"] in [d.number for d in trained]
    _run(task, study, tmp_path, space=space, n_trials=1)  # the space is exhausted: trained anyway, with a note
    assert "still a duplicate" in capsys.readouterr().out


def test_max_trials_and_timeout_stop_the_worker(tmp_path, capsys):
    study = _study(pruner="none")
    assert len(_run(FakeTask(lambda cfg: 0.5), study, tmp_path, n_trials=10, max_trials=3)) == 3
    assert len(_run(FakeTask(lambda cfg: 0.5), study, tmp_path, n_trials=10, max_trials=3)) == 0
    assert "--max-trials 3" in capsys.readouterr().out
    assert len(_run(FakeTask(lambda cfg: 0.5), study, tmp_path, n_trials=10, timeout=0)) == 0


def test_a_preempted_trial_is_queued_again_and_resumes_in_its_folder(tmp_path):
    study = _study(pruner="none")
    calls = []
    task = FakeTask(lambda cfg: 0.5, preempt=lambda cfg: not calls.append(cfg.run_dir) and len(calls) == 1)
    first = _run(task, study, tmp_path, n_trials=3)
    assert [r.state for r in first] == ["PREEMPTED"]  # the worker stops (the job is being requeued)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    second = _run(task, study, tmp_path, n_trials=1)
    assert second[0].state == "COMPLETE" and second[0].params == first[0].params
    assert calls[0] == calls[1] == str(tmp_path / "trials" / "trial_0000")  # the retry runs in the first's folder
    assert study.trials[1].system_attrs["failed_trial"] == 0
    assert "preempted" in study.trials[0].user_attrs["error"] and not study.trials[1].user_attrs["error"]


def test_config_fields_are_the_non_defaults_without_launch_fields():
    cfg = UNetConfig(lr=0.01, run_dir="x", resume=True, depth=3)
    assert config_fields(cfg) == {"lr": 0.01, "depth": 3}
