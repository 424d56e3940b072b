"""A study whose trials are trained by 2 real ranks (horovodrun --gloo), then its best recipe run on 1 and 2 ranks.

python tests/test_tune_multirank.py OUT TUNE_ARGS...   # under horovodrun: jobs.tune, each rank logging OUT/rank{r}.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuning.tasks import ClassifierTask

pytestmark = pytest.mark.multirank

SPACE = "lr: {type: categorical, choices: [0.003, 1.0e-6]}\ndropout: {type: float, low: 0.0, high: 0.5}\n"


class RecordingTask(ClassifierTask):
    """The classifier task, also writing what *this* rank trained: the parameters it got and the epochs it ran."""

    def __init__(self, out: Path):
        super().__init__(tune_fold=0)
        self.out, self.log = out, []

    def train(self, cfg, on_epoch_end):
        from hvdtrain import dist

        entry = {"lr": cfg.lr, "dropout": cfg.dropout, "run_dir": cfg.run_dir, "epochs": [], "size": dist.info().size}
        self.log.append(entry)

        def record(rec):
            entry["epochs"].append(rec["epoch"])
            on_epoch_end(rec)

        try:
            return super().train(cfg, record)
        finally:
            (self.out / f"rank{dist.info().rank}.json").write_text(json.dumps(self.log))


def worker(out: Path, tune_args: list[str]) -> None:
    from jobs.tune import main

    main(tune_args, task=RecordingTask(out))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from conftest import launch, run_cmd

    root = tmp_path_factory.mktemp("tune_mr")
    run_cmd([sys.executable, "-m", "jobs.make_ultrasound", str(root / "us"), "--n-per-class", "10", "--size", "64"])
    (root / "space.yaml").write_text(SPACE)
    args = ["--task", "classifier", "--config", "jobs/configs/classifier_demo.yaml", "--data", str(root / "us"),
            "--model", "small_cnn", "--image-size", "32", "--folds", "3", "--test-fraction", "0.2", "--epochs", "3",
            "--batch-size-per-gpu", "2", "--eval-batch-size", "4", "--threads", "1", "--no-progress", "--monitor",
            "loss", "--warmup-epochs", "0", "--space", str(root / "space.yaml"), "--trials", "4", "--study", "mr",
            "--study-dir", str(root / "study"), "--startup-trials", "4", "--pruner-startup", "1"]  # fmt: skip
    p = launch(2, ["tests/test_tune_multirank.py", str(root), *args], "gloo", timeout=240)
    logs = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    return root, p, logs


def test_both_ranks_train_every_trial_with_the_broadcast_parameters(tuned):
    import optuna

    root, p, (rank0, rank1) = tuned
    assert len(rank0) == len(rank1) == 4
    assert rank0 == rank1  # same parameters, same run folder, same epochs (a prune stops both at once)
    assert all(e["size"] == 2 for e in rank0)
    study = optuna.load_study(study_name="mr", storage=f"sqlite:///{root}/study/study.db")
    assert [(t.params["lr"], t.params["dropout"]) for t in study.trials] == [(e["lr"], e["dropout"]) for e in rank0]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, p.stdout[-3000:]
    for t, e in zip(study.trials, rank0):
        assert len(t.intermediate_values) == len(e["epochs"])  # rank 1 stopped where rank 0 was told to
        assert t.user_attrs["world_size"] == 2 if t.state.name == "COMPLETE" else True
    done = next(t for t in study.trials if t.state.name == "COMPLETE")
    records = [json.loads(line) for line in (Path(done.user_attrs["run_dir"]) / "metrics.jsonl").open()]
    assert {r["world_size"] for r in records} == {2} and records[0]["global_batch"] == 4
    assert p.stdout.count("worker 0 (") == 1  # one worker per launch: only rank 0 holds the study


def test_best_recipe_runs_on_one_and_two_ranks(tuned):
    from conftest import run_cmd

    root, _, _ = tuned
    report = root / "report"
    run_cmd([sys.executable, "-m", "jobs.tune_report", "--study", "mr", "--study-dir", str(root / "study"),
             "--out", str(report)])  # fmt: skip
    meta = json.loads((report / "best_meta.json").read_text())
    assert meta["tuned_gpus"] == 2 and meta["global_batch"] == 4
    out = root / "scaled"
    p = run_cmd([sys.executable, "-m", "jobs.scale", "--best", str(report / "best.yaml"), "--gpus", "1,2",
                 "--rule", "linear", "--warmup", "1", "--out", str(out), "--launch-local"], timeout=300)  # fmt: skip
    assert "global batch 4 -> 2 (x0.5)" in p.stdout and "horovodrun -np 2 --gloo" in p.stdout
    for gpus in (1, 2):
        cv = json.loads((out / f"run_{gpus}gpu" / "cv_metrics.json").read_text())
        assert len(cv["folds"]) == 3
        summary = json.loads((out / f"run_{gpus}gpu" / "fold_0" / "summary.json").read_text())
        assert summary["world_size"] == gpus and summary["global_batch"] == 2 * gpus


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
