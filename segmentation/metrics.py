"""Hard-mask Dice on whole volumes, per case and mean, reduced across ranks once.

Empty ground-truth convention (MONAI `DiceMetric(ignore_empty=True)`, nnU-Net's NaN for 0/0): a case whose
ground truth has no foreground gets Dice NaN and is left out of the mean, *even when the prediction has false
positives*. Such cases are counted (`empty_cases`), and so are those with any predicted voxel
(`empty_fp_cases`), so false alarms stay visible. When every case is empty the mean is NaN (MONAI returns 0
there, which reads as a failure). `dice_global` is the Dice of the summed tp/fp/fn over all cases, which does
count false positives in empty cases.

`DiceMetric.update` is local; `compute()` does one allreduce of the sums (`hvdtrain.metrics.Metric`).
The per-case rows stay local until `gather_rows()` (a collective: call it on every rank) collects them for
the per-case CSV.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hvdtrain import dist
from hvdtrain.metrics import Metric

__all__ = ["dice_per_case", "confusion", "DiceMetric", "write_per_case_csv", "CSV_FIELDS"]

CSV_FIELDS = ("case_id", "dice", "gt_voxels", "pred_voxels", "tp", "fp", "fn", "empty_gt")


def _as_bool(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x) > 0


def confusion(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> tuple[int, int, int]:
    """(tp, fp, fn) voxel counts of two binary masks of the same shape (values > 0 are foreground)."""
    p, t = _as_bool(pred), _as_bool(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} does not match the ground truth {t.shape}")
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp


def dice_per_case(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> tuple[float, bool]:
    """Dice of one case's hard masks: `(2 |P & G| / (|P| + |G|), False)`, or `(nan, True)` for an empty G."""
    tp, fp, fn = confusion(pred, target)
    if tp + fn == 0:
        return math.nan, True
    return 2.0 * tp / (2 * tp + fp + fn), False


class DiceMetric(Metric):
    """Per-case Dice over a validation set, mean over non-empty cases (see the module docstring).

    `compute()` returns `{"dice", "dice_global", "cases", "scored_cases", "empty_cases", "empty_fp_cases"}`.
    """

    fields = ("dice_sum", "scored", "cases", "empty", "empty_fp", "tp", "fp", "fn")

    def reset(self) -> None:
        super().reset()
        self.rows: list[dict[str, Any]] = []

    def update(self, case_id: str, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
        """Record one case (local only); returns its Dice (NaN for an empty ground truth)."""
        tp, fp, fn = confusion(pred, target)
        empty = tp + fn == 0
        dice = math.nan if empty else 2.0 * tp / (2 * tp + fp + fn)
        self.add(cases=1, tp=tp, fp=fp, fn=fn)
        if empty:
            self.add(empty=1, empty_fp=int(fp > 0))
        else:
            self.add(dice_sum=dice, scored=1)
        self.rows.append(
            {
                "case_id": str(case_id),
                "dice": dice,
                "gt_voxels": tp + fn,
                "pred_voxels": tp + fp,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "empty_gt": empty,
            }
        )
        return dice

    def finalize(self, t: dict[str, float]) -> dict[str, float]:
        denom = 2 * t["tp"] + t["fp"] + t["fn"]
        return {
            "dice": t["dice_sum"] / t["scored"] if t["scored"] else math.nan,
            "dice_global": 2 * t["tp"] / denom if denom else math.nan,
            "cases": int(t["cases"]),
            "scored_cases": int(t["scored"]),
            "empty_cases": int(t["empty"]),
            "empty_fp_cases": int(t["empty_fp"]),
        }

    def gather_rows(self, allgather: Callable[[Any], list[Any]] = dist.allgather_object) -> list[dict[str, Any]]:
        """Every rank's per-case rows, sorted by case id (a collective: call on every rank)."""
        rows = [r for part in allgather(self.rows) for r in part]
        return sorted(rows, key=lambda r: r["case_id"])


def write_per_case_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the per-case rows (`DiceMetric.gather_rows()`) as CSV; Dice of an empty ground truth is blank."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            out = {k: r[k] for k in CSV_FIELDS}
            out["dice"] = "" if math.isnan(r["dice"]) else f"{r['dice']:.6f}"
            out["empty_gt"] = int(r["empty_gt"])
            w.writerow(out)
    return path
