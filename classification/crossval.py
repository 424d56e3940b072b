"""Cross-validation of a classifier: the folds in turn, the held-out test split, and the summary.

`cross_validate(cfg)` (every rank): rank 0 scans the data and writes `splits.json` (grouped stratified folds:
near-duplicate images stay in one fold), every rank trains each fold as one `hvdtrain.fit` run in `fold_<k>/`
(best.pt picked by `--monitor`), re-scores its best and last checkpoints, and scores the best one on the held-out
test split (never used for training or checkpoint selection). Rank 0 then writes `summary.md`, `cv_metrics.json`
and `test_metrics.json`: the test split scored by the fold ensemble (mean softmax) with 95% bootstrap intervals
first, CV scores of the best epoch (optimistic: picked on the same fold) beside the last epoch's. With `--resume`
the folds already finished are re-read, not retrained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from hvdtrain import RunPaths, data, dist, evaluate_best, fit
from hvdtrain.loop import device_for, evaluate

from .config import ClassifierConfig
from .data import DataError, load_index
from .engine import build_run, metric_factory, run_cache, subset_dataset
from .metrics import EvalResult, bootstrap_ci, compute_from, summarize_folds
from .report import _json_safe, format_mean_std, honest_lines, plot_confusion, plot_roc, write_fold, write_summary
from .splits import prepare_splits

__all__ = ["cross_validate"]


def cross_validate(cfg: ClassifierConfig) -> dict:
    """Every fold of `cfg` (or `cfg.fold` alone), then the report on rank 0 (a collective).

    Raises `DataError` (every rank) when the data cannot be indexed, split or cached.
    """
    run_dir = Path(cfg.run_dir)
    try:  # bad data stops every rank with the error of the file, not rank 0 alone while the others wait
        index, splits = dist.on_main_then_broadcast(lambda: _split(cfg, run_dir))  # rank 0 scans, hashes, splits
        dist.print0(f"{cfg.data}: {index.describe()}; {splits.describe()}")
        cache = run_cache(cfg, index, run_dir)
    except (OSError, ValueError) as e:
        raise DataError(str(e)) from e
    test_loader = None
    if splits.test:
        test_ds = subset_dataset(index, splits.test, cfg.image_size, cfg.resize_size or None, False, cache, cfg)
        test_loader = data.eval_loader(test_ds, cfg.eval_batch_size)
    per_fold = []
    for k in range(len(splits.folds)) if cfg.fold < 0 else [cfg.fold]:
        r = _fold(cfg, k, index, splits, cache, test_loader)
        if r is None:
            return {"preempted": True, "fold": k}
        per_fold.append(r)
        if dist.is_main():
            write_fold(run_dir, k, r["best"], r["extra"])
        dist.print0(
            f"fold {k}: best epoch {r['extra']['best_epoch']} (optimistic), "
            + ", ".join(f"{m} {r['best'].metrics[m]:.3f}/{r['last'].metrics[m]:.3f}" for m in _MAIN)
            + " (best/last epoch)"
        )
    out: dict = {"folds": [r["best"].metrics for r in per_fold]}
    if dist.is_main():
        out.update(_report(cfg, run_dir, index, splits, per_fold))
    return out


def _split(cfg: ClassifierConfig, run_dir: Path):
    """Rank 0: the image index and the folds (splits.json in the run folder)."""
    index = load_index(cfg.data, cfg.classes or None, cfg.skip_bad)
    run_dir.mkdir(parents=True, exist_ok=True)
    return index, prepare_splits(index, run_dir, cfg.folds, cfg.split_seed, cfg.test_fraction, cfg.dedup_threshold)


def _fold(cfg: ClassifierConfig, k: int, index, splits, cache, test_loader) -> dict | None:
    """Train (or re-read) fold k; its best and last validation results and its best model's test result."""
    fold_cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / f"fold_{k}"), seed=cfg.seed + k)
    paths = RunPaths(fold_cfg.run_dir)
    run = build_run(fold_cfg, index, splits.folds[k], {"fold": k}, cache)
    if cfg.resume and paths.summary.is_file():
        dist.print0(f"fold {k}: finished earlier, re-reading its checkpoints")
    else:
        dist.print0(f"fold {k}: {len(run.train.dataset)} training / {len(run.val.dataset)} validation images")
        if fit(run, fold_cfg)["preempted"]:
            return None
    _, last, last_ckpt = evaluate_best(run, fold_cfg, "last")
    _, best, best_ckpt = evaluate_best(run, fold_cfg, "best")  # the best model stays loaded for the test split
    out = {"best": best.result, "last": last.result, "test": None}
    out["extra"] = {
        "best_epoch": int(best_ckpt["best_epoch"]),
        "last_epoch": int(last_ckpt["epoch"]) - 1,
        "checkpoint": str(paths.best),
        "last_epoch_metrics": last.result.metrics,
    }
    if test_loader is not None:  # the best model (picked on the fold's validation images) on the held-out test
        metric = metric_factory(index.class_names, len(test_loader.dataset))()
        evaluate(run.model, test_loader, run.eval_fn, metric, device_for(), "auto")
        out["test"] = metric.result
        out["extra"]["test"] = metric.result.metrics
    return out


def _write_test(run_dir: Path, ensemble: EvalResult, per_fold: list[EvalResult], indices: list[int]) -> dict:
    data = {
        "ensemble": {
            **ensemble.to_json(with_predictions=True),
            "bootstrap_95": bootstrap_ci(ensemble.probs, ensemble.labels),
        },
        "per_fold": [r.to_json() for r in per_fold],
        "mean_std": summarize_folds(per_fold),
        "test_indices": indices,
    }
    (run_dir / "test_metrics.json").write_text(json.dumps(_json_safe(data), indent=1, default=float))
    plot_confusion(ensemble.confusion, ensemble.class_names, run_dir / "confusion_test.png", "test, fold ensemble")
    plot_roc(ensemble.probs, ensemble.labels, ensemble.class_names, run_dir / "roc_test.png", None, "test, ROC")
    return data


_MAIN = ("accuracy", "balanced_accuracy", "macro_f1")


def _report(cfg: ClassifierConfig, run_dir: Path, index, splits, per_fold: list[dict]) -> dict:
    """Rank 0: summary.md (test split first), cv_metrics.json, test_metrics.json."""
    best, last = [r["best"] for r in per_fold], [r["last"] for r in per_fold]
    tests = [r["test"] for r in per_fold if r["test"] is not None]
    out: dict = {}
    ensemble = None
    if tests:
        ensemble = compute_from(np.mean([t.probs for t in tests], axis=0), tests[0].labels, index.class_names)
        out["test"] = _write_test(run_dir, ensemble, tests, splits.test)
        out["test_ensemble"] = ensemble.metrics
    notes = {
        "data": f"{cfg.data}: {index.describe()}",
        "splits": splits.describe(),
        "model": f"{cfg.model}, dropout {cfg.dropout}, image {cfg.image_size}",
        "recipe": f"{cfg.optimizer} lr {cfg.lr} ({cfg.lr_rule}), {cfg.epochs} epochs, {cfg.schedule}; aug "
        f"{cfg.aug_policy}, mixup {cfg.mixup}, cutmix {cfg.cutmix}, EMA {cfg.ema_decay}, TTA {cfg.tta}, "
        f"mask weight {cfg.mask_weight}",
        "world size": dist.info().size,
    }
    sections = honest_lines(best, last, ensemble, tests)
    extras = [r["extra"] for r in per_fold]
    path = write_summary(run_dir, best, "Cross-validation", notes, extras, sections)
    stats = summarize_folds(best)
    for m in _MAIN:
        print(f"cross-validation {m} (best epoch, optimistic): {format_mean_std(stats[m])}", flush=True)
    if ensemble is not None:
        print("test split, fold ensemble: " + ", ".join(f"{m} {ensemble.metrics[m]:.3f}" for m in _MAIN), flush=True)
    print(f"summary: {path}", flush=True)
    out["mean_std"] = stats
    out["mean_std_last"] = summarize_folds(last)
    out["accuracy_mean"] = float(np.mean([r.metrics["accuracy"] for r in best]))
    return out
