"""Report files: per-fold JSON and plots, Markdown summary with mean +- std; presets parse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from classification.config import ClassifierConfig
from classification.metrics import compute_from
from classification.report import write_fold, write_summary
from hvdtrain.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


def _result(seed):
    rng = np.random.default_rng(seed)
    labels = np.r_[0, 1, 2, rng.integers(0, 3, 17)]
    probs = rng.dirichlet(np.ones(3), 20) + np.eye(3)[labels]
    return compute_from(probs / probs.sum(1, keepdims=True), labels, ["benign", "malignant", "normal"])


def test_fold_and_summary_files(tmp_path):
    results = [_result(s) for s in range(3)]
    d = write_fold(tmp_path, 0, results[0], {"best_epoch": 4})
    data = json.loads((d / "metrics.json").read_text())
    assert data["best_epoch"] == 4 and len(data["probs"]) == 20 and data["confusion_matrix"]
    for name in ("confusion.png", "roc.png"):
        assert (d / name).read_bytes()[:4] == b"\x89PNG"
    md = write_summary(tmp_path, results, notes={"model": "small_cnn"}).read_text()
    assert "± " in md and "| malignant |" in md and "small_cnn" in md and "pooled" in md
    cv = json.loads((tmp_path / "cv_metrics.json").read_text())
    acc = [r.metrics["accuracy"] for r in results]
    assert cv["mean_std"]["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert cv["pooled"]["metrics"]["count"] == 60
    assert (tmp_path / "roc_pooled.png").is_file() and (tmp_path / "confusion_pooled.png").is_file()


@pytest.mark.parametrize("preset", ["classifier_study.yaml", "classifier_default.yaml", "classifier_demo.yaml"])
def test_presets_parse(preset):
    cfg = parse_config(ClassifierConfig, ["--config", str(ROOT / "jobs" / "configs" / preset), "--data", "x"])
    assert cfg.data == "x" and cfg.folds == 5
    if preset == "classifier_study.yaml":
        assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.dropout, cfg.schedule) == ("sgd", 0.001, 0.9, 0.5, "plateau")
