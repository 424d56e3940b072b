"""Metrics against scikit-learn on the same predictions; exactly-once counting across (simulated) ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from classification.metrics import ClassificationMetric, compute_from, pooled, summarize_folds
from classification.report import roc_curve


def _predictions(n: int, c: int, seed: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.standard_normal((n, c)) + 1.5 * np.eye(c)[labels]  # better than chance
    if ties:
        logits = np.round(logits)  # many tied scores: AUC must count ties as half
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


@pytest.mark.parametrize(("c", "ties"), [(3, False), (3, True), (2, False), (4, True)])
def test_against_sklearn(c, ties):
    probs, labels = _predictions(97, c, seed=c, ties=ties)
    r = compute_from(probs, labels, [f"k{i}" for i in range(c)])
    preds = probs.argmax(1)
    m = r.metrics
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert np.array_equal(r.confusion, skm.confusion_matrix(labels, preds, labels=list(range(c))))
    recall = skm.recall_score(labels, preds, average=None)
    f1 = skm.f1_score(labels, preds, average=None)
    for i in range(c):
        assert m[f"sensitivity_k{i}"] == pytest.approx(recall[i])
        spec = skm.recall_score(labels != i, preds != i)  # specificity = recall of the negatives
        assert m[f"specificity_k{i}"] == pytest.approx(spec)
        assert m[f"f1_k{i}"] == pytest.approx(f1[i])
        assert m[f"auc_k{i}"] == pytest.approx(skm.roc_auc_score(labels == i, probs[:, i]))
    if c > 2:
        assert m["auc_macro"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    else:
        assert m["auc_macro"] == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]))
    assert m["count"] == 97


def test_roc_curve_matches_sklearn():
    probs, labels = _predictions(60, 3, seed=9, ties=True)
    fpr, tpr = roc_curve(probs[:, 1], labels == 1)
    sk_fpr, sk_tpr, _ = skm.roc_curve(labels == 1, probs[:, 1], drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)


def test_class_absent_from_fold():
    probs, labels = _predictions(40, 3, seed=5)
    keep = labels != 2
    probs, labels = probs[keep], labels[keep]
    m = compute_from(probs, labels, ["a", "b", "c"]).metrics
    preds = probs.argmax(1)
    assert math.isnan(m["auc_c"]) and math.isnan(m["sensitivity_c"])
    assert m["auc_macro"] == pytest.approx(np.mean([skm.roc_auc_score(labels == i, probs[:, i]) for i in (0, 1)]))
    with pytest.warns(UserWarning):  # scikit-learn warns about the predicted-only class, as it should
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))


def test_metric_counts_each_image_once_across_ranks():
    """Two simulated ranks take indices r, r+2, ...; the summed tables give the single-process metrics."""
    probs, labels = _predictions(11, 3, seed=1)
    logits = torch.log(torch.tensor(probs))
    y = torch.tensor(labels)
    ranks = [ClassificationMetric(["a", "b", "c"], 11) for _ in range(2)]
    for r, m in enumerate(ranks):
        idx = torch.arange(r, 11, 2)
        for chunk in idx.split(2):  # several batches per rank
            m.update(logits[chunk], y[chunk], chunk)
    total = ranks[0].stats + ranks[1].stats
    out = ranks[0].finalize_stats(total)
    ref = compute_from(probs, labels, ["a", "b", "c"]).metrics
    for k, v in ref.items():
        assert out[k] == pytest.approx(v, nan_ok=True), k
    ce = torch.nn.functional.cross_entropy(logits, y).item()
    assert out["loss"] == pytest.approx(ce)
    np.testing.assert_allclose(ranks[0].result.probs, probs)
    # An image evaluated on both ranks (padding duplicates), or on neither, is an error, not a biased metric.
    ranks[1].update(logits[:1], y[:1], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="once"):
        ranks[0].finalize_stats(ranks[0].stats + ranks[1].stats)
    with pytest.raises(RuntimeError, match="never"):
        ranks[0].finalize_stats(ranks[0].stats)


def test_metric_compute_single_process():
    probs, labels = _predictions(8, 2, seed=2)
    m = ClassificationMetric(["x", "y"], 8)
    m.update(torch.log(torch.tensor(probs)).float(), torch.tensor(labels), torch.arange(8))
    out = m.compute()
    assert out["accuracy"] == pytest.approx(compute_from(probs, labels).metrics["accuracy"])
    assert all(isinstance(v, float) for v in out.values())
    m.reset()
    assert m.stats.abs().sum() == 0 and m.result is None


def test_mean_std_and_pooled():
    results = [compute_from(*_predictions(30, 3, seed=s)) for s in range(4)]
    s = summarize_folds(results)
    acc = [r.metrics["accuracy"] for r in results]
    assert s["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert s["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
    assert s["accuracy"]["n"] == 4
    p = pooled(results)
    assert p.metrics["count"] == 120
    assert p.confusion.sum() == 120 and np.array_equal(p.confusion, sum(r.confusion for r in results))


def test_bad_shapes():
    with pytest.raises(ValueError):
        compute_from(np.ones((3, 2)) / 2, np.array([0, 1]))
    with pytest.raises(ValueError):
        compute_from(np.ones((2, 2)) / 2, np.array([0, 2]))


def test_hand_computed_with_absent_class():
    """3 classes, class 2 never true but predicted once: values worked out by hand."""
    labels = np.array([0, 0, 0, 1, 1])
    preds = np.array([0, 0, 1, 1, 2])
    probs = np.eye(3)[preds] * 0.7 + 0.1  # argmax = preds
    r = compute_from(probs, labels, ["a", "b", "c"])
    m = r.metrics
    assert r.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity_a"] == pytest.approx(2 / 3) and m["sensitivity_b"] == pytest.approx(1 / 2)
    assert math.isnan(m["sensitivity_c"]) and math.isnan(m["auc_c"])  # absent: NaN, not 0
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["specificity_a"] == pytest.approx(1.0) and m["specificity_b"] == pytest.approx(2 / 3)
    assert m["specificity_c"] == pytest.approx(4 / 5)
    # F1 = 2TP / (2TP + FP + FN): a 4/5, b 2/4, c 0 (predicted once, never true)
    assert m["f1_a"] == pytest.approx(0.8) and m["f1_b"] == pytest.approx(0.5) and m["f1_c"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    # AUC of class a: scores 0.8 for the 2 predicted a's, 0.1 otherwise; positives {0,1,2}: pairs (pos, neg) = 6,
    # positive 0.8 > negative 0.1: 2 x 2 = 4 wins; positive 2 (0.1) ties 2 negatives: 2 halves -> 5 / 6
    assert m["auc_a"] == pytest.approx(5 / 6)


def test_one_class_only():
    labels = np.zeros(4, dtype=int)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    m = compute_from(probs, labels, ["neg", "pos"]).metrics
    assert m["accuracy"] == pytest.approx(0.75) and m["balanced_accuracy"] == pytest.approx(0.75)
    assert math.isnan(m["auc_neg"]) and math.isnan(m["auc_pos"]) and math.isnan(m["auc_macro"])
    assert math.isnan(m["sensitivity_pos"]) and math.isnan(m["specificity_neg"])  # no negatives of class neg
    assert m["specificity_pos"] == pytest.approx(0.75)
    assert m["f1_neg"] == pytest.approx(6 / 7) and m["f1_pos"] == 0.0


def test_bootstrap_ci_brackets_the_value():
    from classification.metrics import bootstrap_ci

    probs, labels = _predictions(80, 3, seed=3)
    ci = bootstrap_ci(probs, labels, n_boot=60, seed=1)
    for m, v in ci.items():
        assert v["low"] <= v["value"] <= v["high"], m
        assert 0.0 < v["high"] - v["low"] < 0.5 and v["n_boot"] == 60
    assert ci == bootstrap_ci(probs, labels, n_boot=60, seed=1)  # seeded
    perfect = bootstrap_ci(np.eye(3)[labels], labels, n_boot=20)
    assert perfect["accuracy"]["low"] == perfect["accuracy"]["high"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_main_scores_equal_compute_from(seed):
    from classification.metrics import BOOTSTRAP_METRICS, main_scores

    probs, labels = _predictions(50, 3, seed=seed)
    if seed:  # a class absent, one predicted-only
        probs, labels = probs[labels != 2], labels[labels != 2]
    full = compute_from(probs, labels).metrics
    fast = main_scores(probs, labels)
    for m in BOOTSTRAP_METRICS:
        assert fast[m] == pytest.approx(full[m], nan_ok=True), m
