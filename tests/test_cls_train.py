"""jobs.train_classifier end to end: 2 real ranks over all folds, resume, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, launch, run_cmd

ARGS = ["-m", "jobs.train_classifier", "--model", "small_cnn", "--image-size", "32", "--epochs", "2",
        "--folds", "3", "--batch-size-per-gpu", "4", "--eval-batch-size", "8", "--no-progress", "--threads", "1",
        "--lr", "0.002", "--optimizer", "adamw", "--warmup-epochs", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def us_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("us") / "data"
    run_cmd([sys.executable, "-m", "jobs.make_ultrasound", str(out), "--n-per-class", "8", "--size", "48"])
    return out


@pytest.mark.multirank
def test_two_rank_cross_validation_writes_every_fold_and_resumes(us_data, tmp_path):
    run = tmp_path / "run"
    p = launch(2, [*ARGS, "--data", str(us_data), "--run-dir", str(run)])
    assert "cross-validation accuracy" in p.stdout
    splits = json.loads((run / "splits.json").read_text())
    n_images = len(splits["samples"])
    cv = json.loads((run / "cv_metrics.json").read_text())
    assert len(cv["folds"]) == 3
    # Out-of-fold predictions: every image validated exactly once over the folds (and once across the ranks,
    # which ClassificationMetric checks itself).
    assert sum(sum(map(sum, f["confusion_matrix"])) for f in cv["folds"]) == n_images
    for k in range(3):
        fold = run / f"fold_{k}"
        records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
        assert {r["world_size"] for r in records} == {2}
        assert (fold / "confusion.png").stat().st_size > 0 and (fold / "roc.png").stat().st_size > 0
        best = torch.load(fold / "checkpoints" / "best.pt", weights_only=True)
        assert best["config"]["class_names"] == ["benign", "malignant", "normal"]
    assert "mean ± std" in (run / "summary.md").read_text()
    # Resuming a finished run trains nothing again and reports the same numbers.
    mtime = (run / "fold_0" / "checkpoints" / "last.pt").stat().st_mtime_ns
    p2 = launch(2, [*ARGS, "--data", str(us_data), "--run-dir", str(run), "--resume"])
    assert p2.stdout.count("finished earlier") == 3
    assert (run / "fold_0" / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime
    cv2 = json.loads((run / "cv_metrics.json").read_text())
    assert [f["metrics"]["accuracy"] for f in cv2["folds"]] == [f["metrics"]["accuracy"] for f in cv["folds"]]


def test_missing_data_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_folder"
    p = subprocess.run(
        [sys.executable, *ARGS, "--data", str(missing), "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode != 0
    assert str(missing) in p.stderr
    assert not (tmp_path / "run" / "splits.json").exists()
