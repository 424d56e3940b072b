"""Hard-mask Dice per case against a numpy reference; empty ground truth convention; per-case CSV."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from segmentation.metrics import DiceMetric, confusion, dice_per_case, write_per_case_csv


def _reference(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice as in MONAI's DiceHelper: 2|P and G| / (|P| + |G|), NaN for an empty G (ignore_empty=True)."""
    p, g = pred.astype(bool), gt.astype(bool)
    return float("nan") if g.sum() == 0 else 2.0 * (p & g).sum() / (p.sum() + g.sum())


def test_dice_matches_reference_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        gt = rng.random((9, 10, 11)) < rng.uniform(0.01, 0.3)
        pred = rng.random((9, 10, 11)) < rng.uniform(0.0, 0.3)
        dice, empty = dice_per_case(pred, gt)
        assert not empty
        assert dice == pytest.approx(_reference(pred, gt), abs=1e-12)


def test_torch_inputs_and_confusion():
    pred = torch.tensor([[1, 1, 0, 0]])
    gt = torch.tensor([[1, 0, 1, 0]])
    assert confusion(pred, gt) == (1, 1, 1)
    assert dice_per_case(pred, gt) == (0.5, False)


def test_empty_ground_truth_is_nan_and_flagged():
    gt = np.zeros((4, 4, 4))
    dice, empty = dice_per_case(np.zeros((4, 4, 4)), gt)
    assert math.isnan(dice) and empty
    dice, empty = dice_per_case(np.ones((4, 4, 4)), gt)  # false positives: still skipped (MONAI ignore_empty)
    assert math.isnan(dice) and empty


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        dice_per_case(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_metric_mean_skips_empty_and_counts_false_positives():
    m = DiceMetric()
    full = np.ones((2, 2, 2))
    half = np.zeros((2, 2, 2))
    half[0] = 1
    m.update("a", full, full)  # 1.0
    m.update("b", half, full)  # 2*4 / (4+8) = 0.6667
    m.update("c", np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))  # empty, clean
    m.update("d", half, np.zeros((2, 2, 2)))  # empty, 4 false-positive voxels
    out = m.compute()
    assert out["dice"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert out["cases"] == 4 and out["scored_cases"] == 2
    assert out["empty_cases"] == 2 and out["empty_fp_cases"] == 1
    tp, fp, fn = 8 + 4, 0 + 0 + 4, 0 + 4
    assert out["dice_global"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    m.reset()
    assert m.rows == [] and math.isnan(m.compute()["dice"])  # no scored case: NaN, not 0


def test_gather_rows_and_csv(tmp_path):
    rank0, rank1 = DiceMetric(), DiceMetric()
    ones = np.ones((2, 2, 2))
    rank0.update("case_b", ones, ones)
    rank1.update("case_a", np.zeros((2, 2, 2)), ones)
    rank1.update("case_c", ones, np.zeros((2, 2, 2)))
    rows = rank0.gather_rows(allgather=lambda obj: [obj, rank1.rows])  # what allgather_object returns on 2 ranks
    assert [r["case_id"] for r in rows] == ["case_a", "case_b", "case_c"]
    path = write_per_case_csv(rows, tmp_path / "per_case_dice.csv")
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert [(r["case_id"], r["dice"], r["empty_gt"]) for r in got] == [
        ("case_a", "0.000000", "0"),
        ("case_b", "1.000000", "0"),
        ("case_c", "", "1"),
    ]
    assert got[2]["fp"] == "8"
