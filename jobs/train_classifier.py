"""Cross-validated breast-ultrasound classifier (normal / benign / malignant) under Horovod.

    python -m jobs.make_ultrasound data/us --n-per-class 40 --size 128
    horovodrun -np 2 python -m jobs.train_classifier --config jobs/configs/classifier_demo.yaml \
        --data data/us --run-dir runs/cls_demo

The run folder gets `splits.json` (grouped stratified folds: near-duplicate images stay in one fold), one
hvdtrain run per fold in `fold_<k>/` (best.pt picked by `--monitor`, metrics.json, confusion and ROC plots), and
`summary.md` / `cv_metrics.json` with per-class and mean +- std metrics over the folds. With `--test-fraction`
each fold's best model is also scored on the held-out test images (`test_metrics.json`). `--resume` skips the
folds already finished and continues the interrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from classification.config import ClassifierConfig
from classification.data import load_index
from classification.engine import eval_fn, fold_run, metric_factory, subset_dataset
from classification.metrics import ClassificationMetric, summarize_folds
from classification.report import format_mean_std, write_fold, write_summary
from classification.splits import prepare_splits
from hvdtrain import checkpoint, data, dist, parse_config
from hvdtrain.loop import device_for, evaluate


def _best_result(model, fold_dir: Path, loader, make_metric, cfg) -> tuple[ClassificationMetric, dict, int]:
    """The fold's best checkpoint evaluated on `loader` (every rank; rank 0 reads the file and broadcasts it)."""
    best = fold_dir / "checkpoints" / "best.pt"
    ckpt = checkpoint.load_on_all_ranks(best if dist.is_main() else None)
    checkpoint.unwrap(model).load_state_dict(ckpt["model"])
    metric = make_metric()
    values = evaluate(model, loader, eval_fn, metric, device_for(), cfg.amp)
    return metric, values, int(ckpt["best_epoch"])


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(ClassifierConfig, argv)
    if not cfg.data:
        raise SystemExit("train_classifier: --data is required (a class-per-folder root or a CSV manifest)")
    dist.init(cfg.threads or None, cfg.stall_timeout)
    run_dir = Path(cfg.run_dir)
    # Rank 0 scans, hashes and splits; the other ranks get the same index and folds (no file races).
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
    index, splits = prepared
    dist.print0(f"{cfg.data}: {index.describe()}; {splits.describe()}")
    names = index.class_names
    folds = range(len(splits.folds)) if cfg.fold < 0 else [cfg.fold]
    results, extras, test_results = [], [], []
    for k in folds:
        fold = splits.folds[k]
        fold_dir = run_dir / f"fold_{k}"
        fold_cfg = dataclasses.replace(cfg, run_dir=str(fold_dir), seed=cfg.seed + k)
        run = fold_run(fold_cfg, index, fold, {"fold": k})
        if cfg.resume and (fold_dir / "summary.json").is_file():
            dist.print0(f"fold {k}: finished earlier, re-reading its best checkpoint")
        else:
            dist.print0(f"fold {k}: {len(run.train.dataset)} training / {len(run.val.dataset)} validation images")
            if run.fit()["preempted"]:
                return {"preempted": True, "fold": k}
        model, val, make_metric = run.model, run.val, run.make_metric
        metric, values, best_epoch = _best_result(model, fold_dir, val, make_metric, cfg)
        results.append(metric.result)
        extra = {"best_epoch": best_epoch, "checkpoint": str(fold_dir / "checkpoints" / "best.pt")}
        if splits.test:
            test_ds = subset_dataset(index, splits.test, cfg.image_size, cfg.resize_size or None, False)
            test_metric, _, _ = _best_result(
                model,
                fold_dir,
                data.eval_loader(test_ds, cfg.eval_batch_size),
                metric_factory(names, len(test_ds)),
                cfg,
            )
            test_results.append(test_metric.result)
            extra["test"] = test_metric.result.metrics
        extras.append(extra)
        if dist.is_main():
            write_fold(run_dir, k, metric.result, extra)
        dist.print0(
            f"fold {k}: best epoch {best_epoch}, "
            + ", ".join(f"{m} {values[m]:.3f}" for m in ("accuracy", "balanced_accuracy", "macro_f1") if m in values)
        )
    out: dict = {"folds": [r.metrics for r in results]}
    if dist.is_main():
        notes = {
            "data": f"{cfg.data}: {index.describe()}",
            "splits": splits.describe(),
            "model": f"{cfg.model}, dropout {cfg.dropout}, image {cfg.image_size}",
            "recipe": f"{cfg.optimizer} lr {cfg.lr} ({cfg.lr_rule}), {cfg.epochs} epochs, {cfg.schedule}",
            "world size": dist.info().size,
        }
        path = write_summary(run_dir, results, "Cross-validation", notes, extras)
        if test_results:
            test_summary = summarize_folds(test_results)
            (run_dir / "test_metrics.json").write_text(json.dumps(test_summary, indent=1, default=float))
            out["test"] = test_summary
        stats = summarize_folds(results)
        for m in ("accuracy", "balanced_accuracy", "macro_f1"):
            if m in stats:
                print(f"cross-validation {m}: {format_mean_std(stats[m])}", flush=True)
        print(f"summary: {path}", flush=True)
        out["mean_std"] = stats
        out["accuracy_mean"] = float(np.mean([r.metrics["accuracy"] for r in results]))
    return out


if __name__ == "__main__":
    main()
