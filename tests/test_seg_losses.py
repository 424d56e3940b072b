"""Soft Dice loss against hand-computed values (MONAI formula), empty masks, batch vs per-sample, reduce_fn."""

from __future__ import annotations

import math

import pytest
import torch

from segmentation.losses import DeepSupervisionLoss, DiceLoss, soft_dice_stats

S = 1e-5  # default smoothing


def _t(values: list[float]) -> torch.Tensor:
    """(1, 1, 2, 2, 1) tensor from 4 values."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2, 1)


P_A, G_A = _t([0.9, 0.2, 0.6, 0.1]), _t([1, 0, 1, 0])  # tp 1.5, fp 0.3, fn 0.5
P_B, G_B = _t([0.5, 0.5, 0.5, 0.5]), _t([0, 0, 0, 0])  # empty truth: tp 0, fp 2, fn 0


def test_stats_hand_computed():
    tp, fp, fn = soft_dice_stats(P_A, G_A, batch_dice=False)
    assert torch.allclose(torch.stack([tp, fp, fn]).flatten(), torch.tensor([1.5, 0.3, 0.5]))


def test_per_sample_dice_hand_computed():
    loss = DiceLoss(activation="none")(P_A, G_A)
    assert loss.item() == pytest.approx(1 - (3 + S) / (3 + 0.8 + S), abs=1e-6)  # 0.210526


def test_sigmoid_matches_probabilities():
    logits = torch.logit(P_A)
    assert DiceLoss("sigmoid")(logits, G_A).item() == pytest.approx(DiceLoss("none")(P_A, G_A).item(), abs=1e-6)


def test_empty_truth_and_empty_prediction_is_zero_loss():
    zeros = torch.zeros(1, 1, 2, 2, 1)
    assert DiceLoss("none")(zeros, zeros).item() == pytest.approx(0.0, abs=1e-7)


def test_empty_truth_with_false_positives_is_almost_one():
    assert DiceLoss("none")(P_B, G_B).item() == pytest.approx(1 - S / (2 + S), abs=1e-7)


def test_batch_vs_per_sample():
    p, g = torch.cat([P_A, P_B]), torch.cat([G_A, G_B])
    per_sample = DiceLoss("none", batch_dice=False)(p, g).item()
    dice_a, dice_b = (3 + S) / (3.8 + S), S / (2 + S)
    assert per_sample == pytest.approx(1 - (dice_a + dice_b) / 2, abs=1e-6)  # 0.605263
    batch = DiceLoss("none", batch_dice=True)(p, g).item()
    assert batch == pytest.approx(1 - (3 + S) / (3 + 2.3 + 0.5 + S), abs=1e-6)  # tp 1.5, fp 2.3, fn 0.5: 0.482759


def test_reduce_fn_gives_the_global_batch_dice():
    """Rank 0 holds sample A, 'rank 1' sample B: adding B's sums reproduces the batch Dice of A and B together."""
    stats_b = soft_dice_stats(P_B, G_B, batch_dice=True)
    global_loss = DiceLoss("none", batch_dice=True, reduce_fn=lambda s: s + stats_b)(P_A, G_A)
    together = DiceLoss("none", batch_dice=True)(torch.cat([P_A, P_B]), torch.cat([G_A, G_B]))
    assert global_loss.item() == pytest.approx(together.item(), abs=1e-6)


def test_reduce_fn_is_differentiable_and_unused_per_sample():
    logits = torch.logit(P_A).requires_grad_()
    calls = []
    DiceLoss("sigmoid", batch_dice=False, reduce_fn=lambda s: calls.append(1) or s)(logits, G_A)
    assert not calls
    loss = DiceLoss("sigmoid", batch_dice=True, reduce_fn=lambda s: s * 2)(logits, G_A)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_plus_bce():
    logits = torch.zeros(1, 1, 2, 2, 1)  # p = 0.5 everywhere: BCE = ln 2
    dice_only = DiceLoss("sigmoid")(logits, G_A).item()
    both = DiceLoss("sigmoid", ce_weight=0.5)(logits, G_A).item()
    assert both == pytest.approx(dice_only + 0.5 * math.log(2), abs=1e-6)
    # tp = 1, fp = 1, fn = 1: Dice 2/4
    assert dice_only == pytest.approx(1 - (2 + S) / (4 + S), abs=1e-6)


def test_softmax_two_classes_without_background_equals_sigmoid():
    logit = torch.logit(P_A)
    two = torch.cat([torch.zeros_like(logit), logit], dim=1)  # softmax([0, l])[1] = sigmoid(l)
    soft = DiceLoss("softmax", include_background=False)(two, G_A.long())
    assert soft.item() == pytest.approx(DiceLoss("sigmoid")(logit, G_A).item(), abs=1e-6)
    onehot = torch.cat([1 - G_A, G_A], dim=1)
    assert DiceLoss("softmax", include_background=False)(two, onehot).item() == pytest.approx(soft.item(), abs=1e-6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        DiceLoss("sigmoid")(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 1))


def test_deep_supervision_weights_and_target_downsampling():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:6, 2:6, 2:6] = 1
    full = torch.where(target > 0, 30.0, -30.0)
    low = torch.where(torch.nn.functional.interpolate(target, size=(4, 4, 4)) > 0, 30.0, -30.0)
    ds = DeepSupervisionLoss(DiceLoss("sigmoid"))
    assert ds([full, low], target).item() == pytest.approx(0.0, abs=1e-4)  # both levels perfect
    bad_low = -low
    loss = ds([full, bad_low], target).item()
    assert loss == pytest.approx((0.5 / 1.5) * DiceLoss("sigmoid")(bad_low, (low > 0).float()).item(), abs=1e-5)
    assert ds(full, target).item() == pytest.approx(0.0, abs=1e-4)
