"""Study plumbing: storage strings, samplers with per-worker seeds, pruners, worker ids, dead-trial recovery."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState

from tuning.study import (
    StudyError,
    claim_worker,
    count_trials,
    fail_stale,
    heartbeat,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    parse_storage,
    reclaim_orphans,
    worker_seed,
)

ATTRS = {"task": "unet", "monitor": "dice"}


def _study(storage, name="s", direction="maximize", attrs=ATTRS, seed=0):
    return open_study(name, storage, make_sampler("tpe", seed, 2), make_pruner("median", 3), direction, attrs)


def test_worker_seeds_differ_per_worker_and_restart_and_are_reproducible():
    seeds = {worker_seed(0, w) for w in range(256)}
    assert len(seeds) == 256
    assert worker_seed(0, 3) == worker_seed(0, 3)
    assert worker_seed(0, 3, generation=0) != worker_seed(0, 3, generation=7)  # a restarted worker draws anew
    assert worker_seed(0, 3) != worker_seed(1, 3)


def test_samplers_from_different_worker_seeds_draw_different_trials():
    firsts = []
    for worker in range(4):
        sampler = make_sampler("tpe", worker_seed(0, worker), n_startup_trials=10)
        assert sampler._multivariate and sampler._constant_liar  # the recipe this module promises
        study = optuna.create_study(sampler=sampler)
        firsts.append(study.ask().suggest_float("lr", 1e-5, 1e-1, log=True))
    assert len(set(firsts)) == 4
    # The same seed gives the same trials: why every worker needs its own.
    same = [optuna.create_study(sampler=make_sampler("tpe", 5)).ask().suggest_float("x", 0, 1) for _ in range(2)]
    assert same[0] == same[1]
    assert isinstance(make_sampler("gp", 1), optuna.samplers.GPSampler)
    with pytest.raises(StudyError, match="unknown sampler"):
        make_sampler("cmaes", 0)


@pytest.mark.parametrize(
    "kind,cls",
    [
        ("median", optuna.pruners.MedianPruner),
        ("sha", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_pruners(kind, cls):
    assert isinstance(make_pruner(kind, max_epochs=20), cls)


def test_unknown_pruner():
    with pytest.raises(StudyError, match="unknown pruner 'asha'"):
        make_pruner("asha", 10)


def test_storage_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = parse_storage(None, "runs/tune/s")
    assert default.kind == "rdb" and default.url == f"sqlite:///{tmp_path}/runs/tune/s/study.db"
    assert parse_storage("journal:j/s.log", "x") == parse_storage("j/s.log", "x")
    assert (
        parse_storage("j/s.log", "x").kind == "journal" and parse_storage("j/s.log", "x").url == f"{tmp_path}/j/s.log"
    )
    assert parse_storage("runs/tune/unet_lung.journal", "x").kind == "journal"  # as slurm/tune_array.sh passes it
    assert parse_storage("s.db", "x").url == f"sqlite:///{tmp_path}/s.db"
    pg = parse_storage("postgresql://me:secret@db.site/optuna", "x")
    assert pg.kind == "rdb" and "secret" not in pg.describe() and "me:***@db.site" in pg.describe()
    with pytest.raises(StudyError, match="needs a file path"):
        parse_storage("journal:", "x")


def test_study_continues_and_refuses_another_task(tmp_path):
    storage = open_storage(parse_storage(None, tmp_path), heartbeat_interval=0)
    study = _study(storage)
    study.tell(study.ask(), 0.5)
    again = _study(open_storage(parse_storage(None, tmp_path), heartbeat_interval=0))
    assert len(again.trials) == 1 and again.user_attrs["task"] == "unet"
    assert count_trials(storage, "s") == 1 and count_trials(storage, "other") == 0
    with pytest.raises(StudyError, match="task 'unet'"):
        _study(storage, attrs={"task": "classifier", "monitor": "dice"})
    with pytest.raises(StudyError, match="direction maximize"):
        _study(storage, direction="minimize")


def test_worker_ids_are_unique_among_live_workers(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    a, b = claim_worker(tmp_path), claim_worker(tmp_path)
    assert (a.id, b.id) == (0, 1) and a.key != b.key
    with pytest.raises(StudyError, match="worker id 1 is held"):
        claim_worker(tmp_path, worker_id=1)
    a.release()  # a killed worker's lock goes with its process
    assert claim_worker(tmp_path).id == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    w = claim_worker(tmp_path)
    assert w.id == 5 and w.key == "array77:5"


def test_restarted_worker_fails_and_requeues_its_own_running_trials(tmp_path):
    """Journal storage has no heartbeat: the restarted worker (same id) recovers the trial it left RUNNING."""
    storage = open_storage(parse_storage(f"journal:{tmp_path}/s.journal", tmp_path))
    study = _study(storage)
    worker = claim_worker(tmp_path, 0)
    mine = study.ask()
    mine.set_user_attr("worker", worker.key)
    lr = mine.suggest_float("lr", 1e-4, 1e-2, log=True)
    mine.report(0.25, 0)
    theirs = study.ask()  # another live worker's trial: left alone
    theirs.set_user_attr("worker", "otherhost:1")
    worker.release()  # SIGKILL: the trial stays RUNNING

    restarted = claim_worker(tmp_path)
    study = _study(open_storage(parse_storage(f"journal:{tmp_path}/s.journal", tmp_path)))
    assert reclaim_orphans(study, restarted) == [0]
    assert reclaim_orphans(study, restarted) == []  # once only
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    retry = study.trials[2]
    assert retry.params == {"lr": lr} and retry.system_attrs["failed_trial"] == 0
    assert retry.intermediate_values == {0: 0.25}  # kept, so pruning still sees its first epoch
    trial = study.ask()  # the next ask pops the retry with its parameters
    assert trial.number == 2 and trial.suggest_float("lr", 1e-4, 1e-2, log=True) == lr


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # this test asks directly, not through the worker loop
def test_heartbeat_keeps_a_live_trial_and_fails_a_dead_one(tmp_path):
    storage = open_storage(parse_storage(None, tmp_path), heartbeat_interval=1, grace_period=1, max_retry=1)
    study = _study(storage)
    dead, alive = study.ask(), study.ask()
    dead.suggest_float("lr", 1e-4, 1e-2, log=True)
    with heartbeat(study, dead):
        pass  # one beat, then the worker "dies"
    with heartbeat(study, alive):
        time.sleep(2.5)
        fail_stale(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert study.trials[2].params == study.trials[0].params
