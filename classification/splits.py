"""Seeded stratified *grouped* k-fold splits (and a held-out test split), saved in the run folder.

Groups are near-duplicate clusters (`classification.dedup`), so copies of one image never sit on both sides of a
split. The split is made once, written to `RUN_DIR/splits.json` and read back on resume or by a later job, and it
is checked against the dataset it is used with.

For hyper-parameter tuning, `test_fraction > 0` first sets aside a grouped, stratified test split: the folds are
made from the rest only, so tuning (which only looks at folds) never sees the images whose scores are reported.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from hvdtrain.atomic import write_text_atomic

from .data import DataError, ImageIndex
from .dedup import DuplicateReport, find_duplicates

__all__ = [
    "Fold",
    "Splits",
    "grouped_kfold",
    "holdout_split",
    "make_splits",
    "save_splits",
    "load_splits",
    "prepare_splits",
    "SPLITS_FILE",
]

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
_FORMAT = "classification-splits/1"


@dataclass(frozen=True)
class Fold:
    """Indices into the dataset's sample list."""

    train: list[int]
    val: list[int]


@dataclass
class Splits:
    """Folds and test split of one dataset, with what is needed to check it against that dataset again."""

    folds: list[Fold]
    test: list[int]
    groups: list[int]
    labels: list[int]
    paths: list[str]  # relative to the data root, POSIX separators
    class_names: list[str]
    n_splits: int
    seed: int
    test_fraction: float
    dedup_threshold: int
    dedup: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        per_fold = ", ".join(f"{len(f.train)}/{len(f.val)}" for f in self.folds)
        test = f", test {len(self.test)}" if self.test else ""
        return f"{self.n_splits} grouped stratified folds (train/val {per_fold}){test}, seed {self.seed}"


def _check_args(n_splits: int, labels: np.ndarray, groups: np.ndarray) -> None:
    if n_splits < 2:
        raise ValueError(f"need at least 2 folds, got {n_splits}")
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise DataError(f"{n_groups} duplicate groups cannot fill {n_splits} folds; use fewer folds or more images")
    for c in np.unique(labels):
        k = len(np.unique(groups[labels == c]))
        if k < n_splits:
            log.warning(
                "class %d has %d independent images (groups), fewer than %d folds: some validation folds will lack it",
                c,
                k,
                n_splits,
            )


def grouped_kfold(
    labels: Sequence[int],
    groups: Sequence[int],
    n_splits: int = 5,
    seed: int = 0,
    indices: Sequence[int] | None = None,
) -> list[Fold]:
    """Stratified grouped k-fold over `indices` (default: all); returns folds of those (global) indices.

    Every index is in exactly one validation fold, and no group has members in both a fold's train and val.
    """
    labels_all, groups_all = np.asarray(labels), np.asarray(groups)
    idx = np.arange(len(labels_all)) if indices is None else np.asarray(indices, dtype=np.int64)
    y, g = labels_all[idx], groups_all[idx]
    _check_args(n_splits, y, g)
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = []
    for tr, va in sgkf.split(np.zeros(len(idx)), y, g):
        folds.append(Fold(sorted(idx[tr].tolist()), sorted(idx[va].tolist())))
    return folds


def holdout_split(
    labels: Sequence[int], groups: Sequence[int], test_fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(pool, test): a grouped, stratified test split of about `test_fraction` of the images."""
    if not 0.0 < test_fraction <= 0.5:
        raise ValueError(f"test_fraction must be in (0, 0.5], got {test_fraction}")
    # One fold of a round(1/f)-fold grouped split is a stratified, grouped f-sized part.
    first = grouped_kfold(labels, groups, max(2, round(1.0 / test_fraction)), seed)[0]
    return first.train, first.val


def _relative(paths: Sequence[Path], root: Path) -> list[str]:
    return [Path(os.path.relpath(p, root)).as_posix() for p in paths]


def _verify(folds: list[Fold], test: list[int], groups: np.ndarray, n: int) -> None:
    """The invariants the rest of the suite relies on; cheap, so always checked."""
    test_set = set(test)
    seen = np.zeros(n, dtype=np.int64)
    for k, f in enumerate(folds):
        tr, va = set(f.train), set(f.val)
        if tr & va or (tr | va) & test_set:
            raise AssertionError(f"fold {k}: overlapping train/val/test indices")
        if set(groups[list(tr)]) & set(groups[list(va)]) or set(groups[list(tr | va)]) & set(groups[test]):
            raise AssertionError(f"fold {k}: a duplicate group straddles the split")
        seen[f.val] += 1
    pool = np.ones(n, dtype=bool)
    pool[test] = False
    if not np.all(seen[pool] == 1):
        raise AssertionError("every non-test image must be validated in exactly one fold")


def make_splits(
    index: ImageIndex,
    n_splits: int = 5,
    seed: int = 0,
    test_fraction: float = 0.0,
    dedup_threshold: int = 6,
    report: DuplicateReport | None = None,
) -> Splits:
    """Hash and group near-duplicates, hold out a test split (if asked), and make the folds of the rest.

    Args:
        index: the dataset (`classification.data.load_index`).
        n_splits: folds.
        seed: seeds both the test split and the folds.
        test_fraction: 0 for none, else the share of images held out (grouped and stratified).
        dedup_threshold: pHash Hamming threshold; negative turns grouping off (each image its own group).
        report: a `find_duplicates` result to reuse instead of hashing again.
    """
    labels = index.labels
    if dedup_threshold < 0:
        groups, summary = np.arange(len(labels)), {}
    else:
        report = report or find_duplicates(index.paths, labels, dedup_threshold)
        groups, summary = report.groups, report.summary()
    if test_fraction > 0:
        pool, test = holdout_split(labels, groups, test_fraction, seed)
    else:
        pool, test = list(range(len(labels))), []
    folds = grouped_kfold(labels, groups, n_splits, seed, pool)
    _verify(folds, test, groups, len(labels))
    return Splits(
        folds,
        test,
        groups.tolist(),
        labels.tolist(),
        _relative(index.paths, index.root),
        list(index.class_names),
        n_splits,
        seed,
        float(test_fraction),
        int(dedup_threshold),
        summary,
    )


def save_splits(splits: Splits, path: str | Path) -> None:
    """Write `splits` as JSON (atomically: a crash leaves the old file or the new one)."""
    path = Path(path)
    data: dict[str, Any] = {
        "format": _FORMAT,
        "class_names": splits.class_names,
        "n_splits": splits.n_splits,
        "seed": splits.seed,
        "test_fraction": splits.test_fraction,
        "dedup_threshold": splits.dedup_threshold,
        "dedup": splits.dedup,
        "samples": [
            {"path": p, "label": lab, "group": g} for p, lab, g in zip(splits.paths, splits.labels, splits.groups)
        ],
        "test": splits.test,
        "folds": [{"train": f.train, "val": f.val} for f in splits.folds],
    }
    write_text_atomic(path, json.dumps(data, indent=1))


def load_splits(path: str | Path, index: ImageIndex | None = None) -> Splits:
    """Read a splits file; with `index`, check that it describes the same images, labels and classes.

    Raises:
        FileNotFoundError: no such file.
        DataError: not a splits file, or made for a different dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"splits file {path} does not exist")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            raise KeyError("format")
        samples = data["samples"]
        splits = Splits(
            folds=[Fold(list(f["train"]), list(f["val"])) for f in data["folds"]],
            test=list(data["test"]),
            groups=[s["group"] for s in samples],
            labels=[s["label"] for s in samples],
            paths=[s["path"] for s in samples],
            class_names=list(data["class_names"]),
            n_splits=data["n_splits"],
            seed=data["seed"],
            test_fraction=data["test_fraction"],
            dedup_threshold=data["dedup_threshold"],
            dedup=data.get("dedup", {}),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a {_FORMAT} file ({e})") from e
    n = len(splits.paths)
    used = [i for f in splits.folds for i in (*f.train, *f.val)] + splits.test
    if any(not isinstance(i, int) or not 0 <= i < n for i in used):  # a hand-edited or truncated file
        bad = next(i for i in used if not isinstance(i, int) or not 0 <= i < n)
        raise DataError(f"{path} refers to sample {bad!r}, but it lists {n} samples (indices 0..{n - 1})")
    if index is not None:
        _match(splits, index, path)
    return splits


def _match(splits: Splits, index: ImageIndex, path: Path) -> None:
    if splits.class_names != list(index.class_names):
        raise DataError(f"{path} was made for classes {splits.class_names}, the data has {index.class_names}")
    now = list(zip(_relative(index.paths, index.root), index.labels.tolist()))
    then = list(zip(splits.paths, splits.labels))
    if now != then:
        diff = next((f"{a} vs {b}" for a, b in zip(then, now) if a != b), "")
        raise DataError(
            f"{path} was made for a different dataset ({len(then)} images then, {len(now)} now"
            f"{'; first difference: ' + diff if diff else ''}); use a new run folder"
        )


def prepare_splits(
    index: ImageIndex,
    run_dir: str | Path,
    n_splits: int = 5,
    seed: int = 0,
    test_fraction: float = 0.0,
    dedup_threshold: int = 6,
    write: bool = True,
) -> Splits:
    """The run's splits: `RUN_DIR/splits.json` when it exists (checked against data and settings), else new ones.

    Call with `write=True` on rank 0 only and broadcast the result (hashing is deterministic, so computing it on
    every rank with `write=False` also gives the same splits, at the cost of hashing on every rank).

    Raises:
        DataError: the existing file was made for other data or other settings.
    """
    path = Path(run_dir) / SPLITS_FILE
    if path.is_file():
        splits = load_splits(path, index)
        wanted = (n_splits, seed, float(test_fraction), int(dedup_threshold))
        saved = (splits.n_splits, splits.seed, splits.test_fraction, splits.dedup_threshold)
        if wanted != saved:
            raise DataError(
                f"{path} holds splits made with (folds, seed, test_fraction, dedup_threshold) = {saved},"
                f" this run asks for {wanted}; use a new run folder or the saved settings"
            )
        log.info("splits read from %s", path)
        return splits
    splits = make_splits(index, n_splits, seed, test_fraction, dedup_threshold)
    if write:
        save_splits(splits, path)
    return splits
