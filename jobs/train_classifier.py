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
(classification/crossval.py does the work.)
"""

from __future__ import annotations

from classification.config import ClassifierConfig
from classification.crossval import cross_validate
from classification.data import DataError
from hvdtrain import dist, parse_config


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(ClassifierConfig, argv)
    if not cfg.data:
        raise SystemExit("train_classifier: --data is required (a class-per-folder root or a CSV manifest)")
    dist.init(cfg.threads or None, cfg.stall_timeout)
    try:
        return cross_validate(cfg)
    except DataError as e:  # bad data: one line naming the file, on every rank, exit 1
        raise SystemExit(f"train_classifier: {e}") from e


if __name__ == "__main__":
    main()
