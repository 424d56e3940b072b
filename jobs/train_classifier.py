"""Cross-validated breast-ultrasound classifier (normal / benign / malignant) under Horovod.

    python -m jobs.make_ultrasound data/us --n-per-class 40 --size 128
    horovodrun -np 2 python -m jobs.train_classifier --config jobs/configs/classifier_demo.yaml \
        --data data/us --run-dir runs/cls_demo

The run folder gets `splits.json` (grouped stratified folds: near-duplicate images stay in one fold), one
hvdtrain run per fold in `fold_<k>/` (best.pt picked by `--monitor`, metrics.json, confusion and ROC plots), and
`summary.md` / `cv_metrics.json` with per-class and mean +- std metrics over the folds. With `--test-fraction`
the held-out test images (never used for training or checkpoint selection) are scored by the ensemble of the
fold models (mean softmax) and by each fold's best model, with 95% bootstrap intervals (`test_metrics.json`,
the headline of `summary.md`); CV scores of the best epoch (optimistic: picked on the same fold) stand beside the
last epoch's. `--resume` skips the folds already finished and continues the interrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from classification.config import ClassifierConfig
from classification.data import load_index
from classification.engine import eval_fn, fold_run, metric_factory, run_cache, subset_dataset
from classification.metrics import ClassificationMetric, EvalResult, bootstrap_ci, compute_from, summarize_folds
from classification.report import (
    _json_safe,
    format_mean_std,
    honest_lines,
    plot_confusion,
    plot_roc,
    write_fold,
    write_summary,
)
from classification.splits import prepare_splits
from hvdtrain import checkpoint, data, dist, parse_config
from hvdtrain.loop import device_for, evaluate


def _checkpoint_result(model, path: Path, loader, make_metric, eval_step) -> tuple[ClassificationMetric, dict, dict]:
    """A checkpoint evaluated on `loader` (every rank; rank 0 reads the file and broadcasts it)."""
    ckpt = checkpoint.load_on_all_ranks(path if dist.is_main() else None)
    checkpoint.unwrap(model).load_state_dict(ckpt["model"])
    metric = make_metric()
    values = evaluate(model, loader, eval_step, metric, device_for(), "auto")
    return metric, values, ckpt


def _prepare(cfg: ClassifierConfig, run_dir: Path):
    """Rank 0 scans, hashes and splits; the other ranks get the same index and folds (no file races)."""
    prepared = None
    if dist.is_main():
        try:
            index = load_index(cfg.data, cfg.classes or None, cfg.skip_bad)
            run_dir.mkdir(parents=True, exist_ok=True)
            splits = prepare_splits(index, run_dir, cfg.folds, cfg.split_seed, cfg.test_fraction, cfg.dedup_threshold)
            prepared = (index, splits)
        except (OSError, ValueError) as e:  # every rank raises it, instead of waiting for rank 0
            prepared = e
    prepared = dist.broadcast_object(prepared)
    if isinstance(prepared, Exception):
        raise SystemExit(f"train_classifier: {prepared}")
    return prepared


def _fold(cfg: ClassifierConfig, k: int, index, splits, cache, test_loader) -> dict | None:
    """Train (or re-read) fold k; its best and last validation results and its best model's test result."""
    fold_dir = Path(cfg.run_dir) / f"fold_{k}"
    fold_cfg = dataclasses.replace(cfg, run_dir=str(fold_dir), seed=cfg.seed + k)
    run = fold_run(fold_cfg, index, splits.folds[k], {"fold": k}, cache)
    if cfg.resume and (fold_dir / "summary.json").is_file():
        dist.print0(f"fold {k}: finished earlier, re-reading its checkpoints")
    else:
        dist.print0(f"fold {k}: {len(run.train.dataset)} training / {len(run.val.dataset)} validation images")
        if run.fit()["preempted"]:
            return None
    step = run.eval_fn or eval_fn
    ckpts = fold_dir / "checkpoints"
    last, _, last_ckpt = _checkpoint_result(run.model, ckpts / "last.pt", run.val, run.make_metric, step)
    best, values, best_ckpt = _checkpoint_result(run.model, ckpts / "best.pt", run.val, run.make_metric, step)
    out = {"best": best.result, "last": last.result, "values": values, "test": None}
    out["extra"] = {
        "best_epoch": int(best_ckpt["best_epoch"]),
        "last_epoch": int(last_ckpt["epoch"]) - 1,
        "checkpoint": str(ckpts / "best.pt"),
        "last_epoch_metrics": last.result.metrics,
    }
    if test_loader is not None:  # the best model (picked on the fold's validation images) on the held-out test
        metric = metric_factory(index.class_names, len(test_loader.dataset))()
        evaluate(run.model, test_loader, step, metric, device_for(), "auto")
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


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(ClassifierConfig, argv)
    if not cfg.data:
        raise SystemExit("train_classifier: --data is required (a class-per-folder root or a CSV manifest)")
    dist.init(cfg.threads or None, cfg.stall_timeout)
    run_dir = Path(cfg.run_dir)
    index, splits = _prepare(cfg, run_dir)
    dist.print0(f"{cfg.data}: {index.describe()}; {splits.describe()}")
    try:
        cache = run_cache(cfg, index, run_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"train_classifier: {e}") from e
    test_loader = None
    if splits.test:
        test_ds = subset_dataset(index, splits.test, cfg.image_size, cfg.resize_size or None, False, cache, cfg)
        test_loader = data.eval_loader(test_ds, cfg.eval_batch_size)
    folds = range(len(splits.folds)) if cfg.fold < 0 else [cfg.fold]
    per_fold = []
    for k in folds:
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


if __name__ == "__main__":
    main()
