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
import torch

from classification.checkpoint import inference_config, load_pretrained
from classification.config import ClassifierConfig, monitor_mode
from classification.data import load_index
from classification.engine import eval_fn, fold_datasets, make_loss, make_step_fn, metric_factory, subset_dataset
from classification.metrics import ClassificationMetric, summarize_folds
from classification.models import build_model
from classification.report import format_mean_std, write_fold, write_summary
from classification.splits import prepare_splits
from hvdtrain import checkpoint, data, dist, fit, parse_config, to_dict
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
    dist.init(cfg.threads or None)
    run_dir = Path(cfg.run_dir)
    # Rank 0 scans, hashes and splits; the other ranks get the same index and folds (no file races).
    prepared = None
    if dist.is_main():
        index = load_index(cfg.data, cfg.classes or None, cfg.skip_bad)
        run_dir.mkdir(parents=True, exist_ok=True)
        splits = prepare_splits(index, run_dir, cfg.folds, cfg.split_seed, cfg.test_fraction, cfg.dedup_threshold)
        prepared = (index, splits)
    index, splits = dist.broadcast_object(prepared)
    dist.print0(f"{cfg.data}: {index.describe()}; {splits.describe()}")
    names = index.class_names
    folds = range(len(splits.folds)) if cfg.fold < 0 else [cfg.fold]
    results, extras, test_results = [], [], []
    base_config = {**to_dict(cfg), **inference_config(cfg.model, names, cfg.dropout, cfg.image_size, cfg.resize_size)}
    for k in folds:
        fold = splits.folds[k]
        fold_dir = run_dir / f"fold_{k}"
        fold_cfg = dataclasses.replace(cfg, run_dir=str(fold_dir), seed=cfg.seed + k)
        train_ds, val_ds = fold_datasets(index, fold, cfg.image_size, cfg.resize_size or None, cfg.augment)
        val = data.eval_loader(val_ds, cfg.eval_batch_size, cfg.num_workers)
        make_metric = metric_factory(names, len(val_ds))
        torch.manual_seed(fold_cfg.seed)
        model = build_model(cfg.model, len(names), cfg.dropout)
        if cfg.weights:
            load_pretrained(model, cfg.model, cfg.weights)
        done = (fold_dir / "summary.json").is_file() and cfg.resume
        if done:
            dist.print0(f"fold {k}: finished earlier, re-reading its best checkpoint")
        else:
            micro = cfg.accum * cfg.simulate_gpus
            train = data.train_loader(
                train_ds, cfg.batch_size_per_gpu, fold_cfg.seed, cfg.num_workers, micro_per_step=micro
            )
            labels = index.labels[fold.train]
            dist.print0(f"fold {k}: {len(train_ds)} training / {len(val_ds)} validation images")
            summary = fit(
                model,
                train,
                val,
                make_step_fn(make_loss(labels, len(names), cfg.label_smoothing, cfg.class_weighted)),
                eval_fn,
                make_metric,
                fold_cfg,
                {**base_config, "run_dir": str(fold_dir), "seed": fold_cfg.seed, "fold": k},
                monitor=cfg.monitor,
                mode=monitor_mode(cfg.monitor),
            )
            if summary["preempted"]:
                return {"preempted": True, "fold": k}
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
