"""jobs.tune / jobs.tune_report end to end on synthetic data: a real study with pruning, a worker killed with
SIGKILL and restarted, two workers on one storage, the U-Net via slurm/tune_array.sh's command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import ROOT, run_cmd
from optuna.trial import TrialState

from classification.config import ClassifierConfig
from hvdtrain import parse_config

SPACE = "lr: {type: log-float, low: 1.0e-5, high: 3.0e-2}\ndropout: {type: float, low: 0.0, high: 0.5}\n"
# small_cnn on 32-pixel crops; validation loss as the objective (continuous: the median pruner has ties rarely).
CLS = ["-m", "jobs.tune", "--task", "classifier", "--config", "jobs/configs/classifier_demo.yaml", "--model",
       "small_cnn", "--image-size", "32", "--folds", "3", "--test-fraction", "0.2", "--batch-size-per-gpu", "4",
       "--eval-batch-size", "8", "--threads", "1", "--no-progress", "--monitor", "loss", "--warmup-epochs", "0",
       "--startup-trials", "4", "--pruner-startup", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def us(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_us")
    run_cmd([sys.executable, "-m", "jobs.make_ultrasound", str(root / "us"), "--n-per-class", "10", "--size", "64"])
    (root / "space.yaml").write_text(SPACE)
    return root


def _args(us, study_dir, *extra):
    return [sys.executable, *CLS, "--data", str(us / "us"), "--space", str(us / "space.yaml"),
            "--study-dir", str(study_dir), *extra]  # fmt: skip


def _load(name, storage):
    return optuna.load_study(study_name=name, storage=storage)


def test_study_of_eight_trials_prunes_and_reports(us, tmp_path):
    study_dir = tmp_path / "real"
    t0 = time.perf_counter()
    p = run_cmd(_args(us, study_dir, "--epochs", "3", "--trials", "8", "--study", "real"))
    wall = time.perf_counter() - t0
    study = _load("real", f"sqlite:///{study_dir}/study.db")
    states = [t.state for t in study.trials]
    n_pruned = states.count(TrialState.PRUNED)
    print(f"8-trial study: {states.count(TrialState.COMPLETE)} complete, {n_pruned} pruned, {wall:.1f} s wall")
    assert len(study.trials) == 8 and n_pruned >= 1 and states.count(TrialState.COMPLETE) >= 2
    assert p.stdout.count(" PRUNED ") == n_pruned and "study real: 8 trials" in p.stdout
    # Tuning never touched the test split nor the outer fold's validation images.
    split = json.loads((study_dir / "tuning_split.json").read_text())
    tuned = set(split["train"]) | set(split["val"])
    assert tuned and not tuned & (set(split["never_seen"]["test"]) | set(split["never_seen"]["outer_fold_val"]))
    splits = json.loads((study_dir / "splits.json").read_text())  # the file jobs.train_classifier would make
    assert splits["test"] == split["never_seen"]["test"]

    out = tmp_path / "report"
    r = run_cmd([sys.executable, "-m", "jobs.tune_report", "--study", "real", "--study-dir", str(study_dir),
                 "--out", str(out)])  # fmt: skip
    assert f"best trial {study.best_trial.number}" in r.stdout
    for png in ("history.png", "importances.png", "parallel.png", "intermediate.png"):
        assert (out / png).stat().st_size > 1000, png
    cfg = parse_config(ClassifierConfig, ["--config", str(out / "best.yaml")])  # what the trainer will read
    assert cfg.lr == study.best_params["lr"] and cfg.dropout == study.best_params["dropout"]
    assert (cfg.model, cfg.image_size, cfg.monitor, cfg.test_fraction) == ("small_cnn", 32, "loss", 0.2)
    meta = json.loads((out / "best_meta.json").read_text())
    assert meta["task"] == "classifier" and meta["tuned_gpus"] == 1 and meta["counts"]["pruned"] == n_pruned


def _poll_running(storage_url: str, name: str, number: int, min_epochs: int, proc, timeout: float = 120):
    """Wait until trial `number` is RUNNING with `min_epochs` reported epochs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the worker finished before it could be killed"
        try:
            trials = _load(name, storage_url).trials
        except Exception:  # the study may not exist yet, or the file is busy
            trials = []
        if len(trials) > number and trials[number].state == TrialState.RUNNING:
            if len(trials[number].intermediate_values) >= min_epochs:
                return
        time.sleep(0.05)
    raise AssertionError("trial never reached the epoch to kill it at")


def test_killed_worker_resumes_the_study(us, tmp_path):
    study_dir = tmp_path / "kill"
    url = f"sqlite:///{study_dir}/study.db"
    cmd = _args(us, study_dir, "--epochs", "20", "--trials", "3", "--study", "kill", "--pruner", "none",
                "--heartbeat", "1")  # fmt: skip
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _poll_running(url, "kill", 1, 2, proc)
    finally:
        proc.send_signal(signal.SIGKILL)  # no handler runs: the trial is left RUNNING
        proc.wait()
    before = _load("kill", url).trials
    assert before[1].state == TrialState.RUNNING and (study_dir / "trials" / "trial_0001" / "checkpoints").is_dir()

    p = run_cmd(cmd)  # the same command again
    assert "left RUNNING by a killed run" in p.stdout
    trials = _load("kill", url).trials
    assert trials[0].state == TrialState.COMPLETE and trials[1].state == TrialState.FAIL
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == before[1].params
    assert retry.state == TrialState.COMPLETE and "trial 2 (retry of trial 1) COMPLETE" in p.stdout
    # The retry resumed the killed trial's run: every epoch is logged once, from the checkpoint on.
    records = [json.loads(line) for line in (study_dir / "trials" / "trial_0001" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records if r["split"] == "val"] == list(range(20))
    assert "resumed from" in p.stdout
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4  # 1 + 3 after restart


def test_two_workers_share_one_journal_without_duplicates(us, tmp_path):
    journal = tmp_path / "shared.journal"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = _args(us, tmp_path / "shared", "--epochs", "2", "--trials", "4", "--study", "shared",
                "--storage", f"journal:{journal}")  # fmt: skip
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = _load("shared", optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))))
    trained = trials.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trained) == 8
    assert {t.user_attrs["worker_id"] for t in trained} == {0, 1}
    seeds = {t.user_attrs["worker_id"]: t.user_attrs["sampler_seed"] for t in trained}
    assert seeds[0] != seeds[1]
    params = [tuple(sorted(t.params.items())) for t in trained]
    assert len(set(params)) == len(params)
    assert all(re.search(r"worker \d \(", out) for out in outs)


def test_unet_with_the_tune_array_command_line(tmp_path, root):
    script = (root / "slurm" / "tune_array.sh").read_text()
    line = next(ln.strip() for ln in script.splitlines() if "python -m jobs.tune" in ln)
    args = line.split(" &")[0].replace('"$@"', "").replace('"$STUDY"', "lung").split()
    args = [a.replace('"$STORAGE"', str(tmp_path / "unet_lung.journal")) for a in args]
    assert args[:3] == ["python", "-m", "jobs.tune"]
    p = run_cmd([sys.executable, *args[1:], "--dry-run"])
    assert "journal file" in p.stdout and "4 trial(s) here" in p.stdout  # the template's command parses

    data = tmp_path / "ph"
    run_cmd([sys.executable, "-m", "jobs.make_phantoms", str(data), "--preset", "demo", "--n-train", "4",
             "--n-val", "2", "--n-test", "1", "--shape", "32", "32", "16", "--spacing", "2", "2", "2.5",
             "--diameter-mm", "8", "12"])  # fmt: skip
    tiny = ["--data", str(data), "--patch-size", "16", "16", "8", "--features", "4", "--depth", "2", "--epochs", "3",
            "--samples-per-volume", "2", "--sw-batch-size", "1", "--threads", "1", "--no-progress",
            "--num-workers", "0", "--amp", "off", "--no-deep-supervision", "--target-spacing", "0", "0", "0",
            "--sw-overlap", "0", "--startup-trials", "4", "--pruner-startup", "2"]  # fmt: skip
    # A real 8-trial study on phantoms (about 12 s): the median pruner stops some trials after their first epoch.
    args[args.index("--trials") + 1] = "8"
    study_dir = tmp_path / "unet"
    p = run_cmd([sys.executable, *args[1:], *tiny, "--study-dir", str(study_dir)])
    assert "validation split" in p.stdout
    trials = _load("lung", optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "unet_lung.journal")))).trials  # fmt: skip
    states = [t.state for t in trials]
    assert len(trials) == 8 and states.count(TrialState.PRUNED) >= 1 and states.count(TrialState.COMPLETE) >= 2
    out = tmp_path / "report"
    run_cmd([sys.executable, "-m", "jobs.tune_report", "--study", "lung", "--storage",
             str(tmp_path / "unet_lung.journal"), "--out", str(out)])  # fmt: skip
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["features"] == 4 and best["patch_size"] == [16, 16, 8] and "lr" in best


def test_bad_input_is_reported(us, tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("lr: {type: log-float, low: 0, high: 1}\n")
    p = subprocess.run([*_args(us, tmp_path / "b", "--trials", "1", "--study", "b"), "--space", str(bad)], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and f"search space file {bad}: lr: a log scale needs low > 0" in p.stderr
    p = subprocess.run([sys.executable, "-m", "jobs.tune_report", "--study", "nope", "--storage",
                        str(tmp_path / "none.db"), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                       text=True)  # fmt: skip
    assert p.returncode == 2 and "does not exist" in p.stderr and not (tmp_path / "none.db").exists()
