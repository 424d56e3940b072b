"""Classification metrics (scikit-learn): a pure `compute_from(probs, labels)`, bootstrap intervals, and a rank-aware
accumulating metric.

Reported (keys of `EvalResult.metrics`):

* `accuracy`; `balanced_accuracy` (mean recall over classes present in the labels, as scikit-learn);
* `macro_f1` (mean F1 over classes present in labels or predictions, as scikit-learn's default);
* `sensitivity_<class>` (recall), `specificity_<class>` (TN / (TN + FP)), `f1_<class>`;
* `auc_<class>` one-vs-rest ROC AUC from the class probability (ties count half), `auc_macro` their mean;
* `bootstrap_ci` gives percentile intervals of the main scores (images resampled with replacement);
* `loss` (mean cross-entropy, from `ClassificationMetric` only) and `count` (images evaluated).

Undefined values (a class absent from a fold) are NaN and left out of the means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn import metrics as skm

from hvdtrain import dist
from hvdtrain.metrics import Metric

__all__ = [
    "EvalResult",
    "confusion_matrix",
    "roc_auc_ovr",
    "compute_from",
    "summarize_folds",
    "pooled",
    "bootstrap_ci",
    "main_scores",
    "BOOTSTRAP_METRICS",
    "ClassificationMetric",
]


@dataclass
class EvalResult:
    """Metrics of one evaluation, with the predictions they came from (for ROC plots and pooling)."""

    metrics: dict[str, float]
    confusion: np.ndarray  # (C, C) counts, rows = true class, columns = predicted class
    probs: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,)
    class_names: list[str]

    def to_json(self, with_predictions: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metrics": self.metrics,
            "class_names": self.class_names,
            "confusion_matrix": self.confusion.tolist(),
        }
        if with_predictions:
            out["probs"] = self.probs.tolist()
            out["labels"] = self.labels.tolist()
        return out


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class (scikit-learn's, every class listed)."""
    return skm.confusion_matrix(np.asarray(labels), np.asarray(preds), labels=list(range(num_classes))).astype(np.int64)


def roc_auc_ovr(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per class (scikit-learn; ties count half); NaN for a class without both sides."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    out = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        pos = labels == c
        if pos.any() and not pos.all():
            out[c] = skm.roc_auc_score(pos, probs[:, c])
    return out


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")


def _per_class(labels: np.ndarray, preds: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, specificity, F1) per class from scikit-learn; NaN where undefined (0/0), never a silent 0."""
    classes = list(range(c))
    _, recall, f1, _ = skm.precision_recall_fscore_support(labels, preds, labels=classes, zero_division=np.nan)
    mcm = skm.multilabel_confusion_matrix(labels, preds, labels=classes)  # (C, 2, 2): [[tn, fp], [fn, tp]]
    tn, fp = mcm[:, 0, 0].astype(np.float64), mcm[:, 0, 1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        specificity = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan)
    return np.asarray(recall, dtype=np.float64), specificity, np.asarray(f1, dtype=np.float64)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


def compute_from(
    probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, class_names: Sequence[str] | None = None
) -> EvalResult:
    """All metrics from class probabilities (N, C) and integer labels (N,); prediction = argmax.

    Pure function: the caller gathers predictions from every rank first (`ClassificationMetric` does). The numbers
    come from `sklearn.metrics`; a class absent from `labels` keeps NaN recall/AUC and is left out of the means.
    """
    probs = _as_numpy(probs).astype(np.float64)
    labels = _as_numpy(labels).astype(np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"expected probs (N, C) and labels (N,), got {probs.shape} and {labels.shape}")
    n, c = probs.shape
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} probability columns")
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must be in [0, {c}), got {labels.min()}..{labels.max()}")
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, c)
    if n:
        recall, specificity, f1 = _per_class(labels, preds, c)
        auc = roc_auc_ovr(probs, labels)
    else:
        recall = specificity = f1 = auc = np.full(c, np.nan)
    m: dict[str, float] = {
        "accuracy": float(skm.accuracy_score(labels, preds)) if n else float("nan"),
        # = scikit-learn's balanced_accuracy_score (mean recall over the classes present), without its warning
        "balanced_accuracy": _nanmean(recall),
        "macro_f1": _nanmean(f1),  # scikit-learn's macro F1 with zero_division=nan: 0/0 classes left out
        "auc_macro": _nanmean(auc),
    }
    for i, name in enumerate(names):
        m[f"sensitivity_{name}"] = float(recall[i])
        m[f"specificity_{name}"] = float(specificity[i])
        m[f"f1_{name}"] = float(f1[i])
        m[f"auc_{name}"] = float(auc[i])
    m["count"] = float(n)
    return EvalResult(m, cm, probs, labels, names)


def summarize_folds(results: Sequence[EvalResult | dict[str, float]]) -> dict[str, dict[str, float]]:
    """`{metric: {"mean", "std", "n"}}` across folds; std is the sample std (ddof=1), NaN folds left out."""
    dicts = [r.metrics if isinstance(r, EvalResult) else r for r in results]
    keys = [k for k in dicts[0] if all(k in d for d in dicts)] if dicts else []
    out = {}
    for k in keys:
        v = np.array([d[k] for d in dicts], dtype=np.float64)
        v = v[~np.isnan(v)]
        out[k] = {
            "mean": float(v.mean()) if len(v) else float("nan"),
            "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "n": len(v),
        }
    return out


def pooled(results: Sequence[EvalResult]) -> EvalResult:
    """Metrics of all folds' validation predictions together (each image once: out-of-fold predictions)."""
    return compute_from(
        np.concatenate([r.probs for r in results]), np.concatenate([r.labels for r in results]), results[0].class_names
    )


BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro")


def main_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """`BOOTSTRAP_METRICS` as `compute_from` gives them (tested equal), ~50x faster for the bootstrap loop: the
    confusion matrix once, recall and F1 from it, one-vs-rest AUC as the Mann-Whitney U of average ranks."""
    c = probs.shape[1]
    preds = probs.argmax(axis=1)
    cm = np.bincount(labels * c + preds, minlength=c * c).reshape(c, c).astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), np.nan)
    return {
        "accuracy": float(tp.sum() / len(labels)),
        "balanced_accuracy": _nanmean(recall),
        "macro_f1": _nanmean(f1),
        "auc_macro": _nanmean(_rank_auc(probs, labels)),
    }


def _rank_auc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    ranks = rankdata(probs, axis=0)  # average ranks: ties count half
    out = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        pos = labels == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            out[c] = (ranks[pos, c].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def bootstrap_ci(
    probs: np.ndarray,
    labels: np.ndarray,
    metrics: Sequence[str] = BOOTSTRAP_METRICS,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap intervals: `{metric: {"value", "low", "high", "n_boot"}}`.

    Images are resampled with replacement `n_boot` times (seeded); each resample is scored with `compute_from`.
    A resample where a metric is undefined (NaN) is left out of that metric's interval.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(labels) == 0:
        raise ValueError("bootstrap_ci needs at least one prediction")
    rng = np.random.default_rng(seed)
    point = compute_from(probs, labels).metrics
    draws = {m: [] for m in metrics}
    for _ in range(n_boot):
        i = rng.integers(0, len(labels), len(labels))
        values = main_scores(probs[i], labels[i])
        for m in metrics:
            draws[m].append(values[m])
    out = {}
    alpha = (1.0 - level) / 2
    for m in metrics:
        v = np.array(draws[m], dtype=np.float64)
        v = v[~np.isnan(v)]
        lo, hi = np.quantile(v, [alpha, 1 - alpha]) if len(v) else (np.nan, np.nan)
        out[m] = {"value": float(point[m]), "low": float(lo), "high": float(hi), "n_boot": len(v)}
    return out


class ClassificationMetric(Metric):
    """Accumulates per-image probabilities, labels and losses; one allreduce in `compute()`.

    Each rank writes its images' rows of an (N, C + 3) table by dataset index (zeros elsewhere), so the summed
    table holds every image's prediction exactly once: exact AUC and per-class numbers from a single collective,
    and a check that every image was evaluated once (columns: C probabilities, label, times seen, loss).

    After `compute()`, `self.result` is the full `EvalResult` (confusion matrix, probabilities) on every rank.

    Args:
        class_names: label order.
        num_samples: the size of the evaluated dataset (all ranks together).
    """

    def __init__(self, class_names: Sequence[str], num_samples: int) -> None:
        self.class_names = list(class_names)
        self.num_classes, self.num_samples = len(self.class_names), int(num_samples)
        self.result: EvalResult | None = None
        super().__init__()

    def reset(self) -> None:
        self.stats = torch.zeros(self.num_samples, self.num_classes + 3, dtype=torch.float64)
        self.result = None

    def update(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Local only. `logits` (B, C), `labels` (B,), `indices` (B,) positions in the evaluated dataset."""
        logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
        labels = labels.detach().to("cpu", torch.int64)
        loss = -logp.gather(1, labels[:, None])
        block = torch.cat([logp.exp(), labels[:, None].double(), torch.ones_like(loss), loss], dim=1)
        self.stats.index_add_(0, indices.detach().to("cpu", torch.int64), block)

    def compute(self) -> dict[str, float]:
        totals = dist.allreduce(self.stats, op="sum", name="metric.ClassificationMetric")
        return self.finalize_stats(totals)

    def finalize_stats(self, totals: torch.Tensor) -> dict[str, float]:
        """Summed table -> metrics (split out so tests can sum tables of simulated ranks)."""
        c = self.num_classes
        seen = totals[:, c + 1].round().long()
        if not bool((seen == 1).all()):
            raise RuntimeError(
                f"evaluation must count each image once: {int((seen > 1).sum())} image(s) seen "
                f"more than once, {int((seen == 0).sum())} never, of {self.num_samples}"
            )
        self.result = compute_from(totals[:, :c], totals[:, c].round().long(), self.class_names)
        return {**self.result.metrics, "loss": float(totals[:, c + 2].mean())}
