"""The tasks a study can tune: each trains one trial through the same library path as its trainer.

A task holds the data split it tunes on (prepared once per launch) and trains one config with `hvdtrain.fit`,
passing `on_epoch_end` so the objective sees every validation record. Both methods are collectives: every rank
calls them.

Held-out data:

* U-Net: trials are scored on the dataset's validation split (its `validation` list, or the seeded
  `--val-fraction` split). The number to publish must come from a separate test set (imagesTs/labelsTs, scored
  with `python -m jobs.predict`), which the study never sees.
* Classifier: the trainer's splits are made in the study folder exactly as `jobs.train_classifier` makes them
  (same seed, folds, test fraction, duplicate groups). Tuning uses one inner fold of the *training part* of
  outer fold `tune_fold`: the test split and that outer fold's validation images are never seen by a trial.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from classification.config import ClassifierConfig, monitor_mode
from classification.data import load_index
from classification.engine import build_run as build_classifier_run
from classification.splits import Fold, grouped_kfold, prepare_splits
from hvdtrain import dist, fit
from segmentation.config import UNetConfig
from segmentation.engine import build_run as build_unet_run
from segmentation.engine import prepare_data

__all__ = ["Task", "UNetTask", "ClassifierTask", "TASKS", "make_task"]

OnEpochEnd = Callable[[dict], None]


class Task:
    """What the objective needs from a task."""

    name: str = ""
    config_cls: type = object

    def monitor(self, cfg: Any) -> tuple[str, str]:
        """(validation key, "max" | "min")."""
        raise NotImplementedError

    def prepare(self, cfg: Any, study_dir: Path) -> str:
        """Set up the tuning split (collective, once per launch); returns a one-line description."""
        raise NotImplementedError

    def train(self, cfg: Any, on_epoch_end: OnEpochEnd) -> dict[str, Any]:
        """One trial's training run (collective); the `hvdtrain.fit` summary plus `train_samples`."""
        raise NotImplementedError


class UNetTask(Task):
    """3D U-Net on the validation split (see the module docstring)."""

    name = "unet"
    config_cls = UNetConfig

    def monitor(self, cfg: UNetConfig) -> tuple[str, str]:
        return cfg.monitor, "max"

    def prepare(self, cfg: UNetConfig, study_dir: Path) -> str:
        train, val = prepare_data(cfg)  # preprocessing is cached: later trials only read it
        return (
            f"{cfg.data}: {len(train)} training / {len(val)} validation cases; trials are scored on the validation "
            "split: report the tuned model on a separate test set"
        )

    def train(self, cfg: UNetConfig, on_epoch_end: OnEpochEnd) -> dict[str, Any]:
        train_cases, val_cases = prepare_data(cfg, progress=False)  # per trial: a trial may change preprocessing
        return fit(build_unet_run(cfg, train_cases, val_cases), cfg, on_epoch_end)


class ClassifierTask(Task):
    """Image classifier on an inner fold of the training folds (see the module docstring)."""

    name = "classifier"
    config_cls = ClassifierConfig

    def __init__(self, tune_fold: int = 0):
        self.tune_fold = tune_fold
        self.index = None
        self.fold: Fold | None = None

    def monitor(self, cfg: ClassifierConfig) -> tuple[str, str]:
        return cfg.monitor, monitor_mode(cfg.monitor)

    def prepare(self, cfg: ClassifierConfig, study_dir: Path) -> str:
        if not cfg.data:
            raise ValueError("the classifier task needs --data (a class-per-folder root or a CSV manifest)")
        # Rank 0 scans, hashes and splits; the other ranks get the result (or its error).
        self.index, self.fold, n_test, n_outer_val = dist.on_main_then_broadcast(
            lambda: self._split(cfg, Path(study_dir))
        )
        self.cache_dir = str(Path(study_dir) / "data_cache")  # one image cache for every trial of the study
        held = f"test split {n_test}" if n_test else "no test split (set --test-fraction to keep one)"
        return (
            f"{cfg.data}: {self.index.describe()}; tuning on inner fold 0 of outer fold {self.tune_fold}'s training "
            f"part ({len(self.fold.train)} train / {len(self.fold.val)} val); never seen: {held}, "
            f"outer fold {self.tune_fold} validation {n_outer_val}"
        )

    def _split(self, cfg: ClassifierConfig, study_dir: Path) -> tuple:
        """Rank 0: the trainer's splits (saved in the study folder), then inner fold 0 of the tuned outer fold."""
        index = load_index(cfg.data, cfg.classes or None, cfg.skip_bad)
        splits = prepare_splits(index, study_dir, cfg.folds, cfg.split_seed, cfg.test_fraction, cfg.dedup_threshold)
        if not 0 <= self.tune_fold < len(splits.folds):
            raise ValueError(f"--tune-fold {self.tune_fold} is not one of the {len(splits.folds)} folds")
        outer = splits.folds[self.tune_fold]
        inner = grouped_kfold(splits.labels, splits.groups, cfg.folds, cfg.split_seed, outer.train)[0]
        note = {
            "outer_fold": self.tune_fold,
            "train": inner.train,
            "val": inner.val,
            "never_seen": {"test": splits.test, "outer_fold_val": outer.val},
        }
        (study_dir / "tuning_split.json").write_text(json.dumps(note, indent=1))
        return index, inner, len(splits.test), len(outer.val)

    def train(self, cfg: ClassifierConfig, on_epoch_end: OnEpochEnd) -> dict[str, Any]:
        index, fold = self.index, self.fold
        if index is None or fold is None:
            raise RuntimeError("ClassifierTask.prepare must run before train")
        if cfg.cache and not cfg.cache_dir:
            cfg = dataclasses.replace(cfg, cache_dir=getattr(self, "cache_dir", ""))
        return fit(build_classifier_run(cfg, index, fold), cfg, on_epoch_end)


TASKS: dict[str, type[Task]] = {"unet": UNetTask, "classifier": ClassifierTask}


def make_task(name: str, tune_fold: int = 0) -> Task:
    """The task called `name`; `tune_fold` is the classifier's outer fold whose training part is tuned on."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return ClassifierTask(tune_fold) if name == "classifier" else UNetTask()
