"""Cross-validation report: per-fold JSON and plots, a Markdown summary with mean +- std. Call on rank 0 only.

Layout written under `out_dir`::

    fold_<k>/metrics.json      metrics, confusion matrix, and the fold's validation probabilities and labels
    fold_<k>/confusion.png     confusion matrix (counts and row percentages)
    fold_<k>/roc.png           one-vs-rest ROC curves with AUCs
    cv_metrics.json            per-fold metrics, mean/std/n per metric, pooled out-of-fold metrics
    confusion_pooled.png, roc_pooled.png   the same plots over all folds' validation predictions
    summary.md                 the tables

Figures are drawn with matplotlib's object API on an Agg canvas, so no GUI backend or global state is touched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from .metrics import BOOTSTRAP_METRICS, EvalResult, bootstrap_ci, pooled, summarize_folds

__all__ = [
    "roc_curve",
    "plot_confusion",
    "plot_roc",
    "write_fold",
    "write_summary",
    "format_mean_std",
    "format_ci",
    "honest_lines",
]

_MAIN = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."),
    ("macro_f1", "macro F1"),
    ("auc_macro", "macro AUC"),
)


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1) (scikit-learn)."""
    fpr, tpr, _ = skm.roc_curve(np.asarray(positive, dtype=bool), np.asarray(scores, dtype=np.float64),
                                drop_intermediate=False)  # fmt: skip
    return fpr, tpr


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Confusion matrix (rows true, columns predicted) with counts and row percentages, as PNG."""
    cm = np.asarray(cm)
    k = len(class_names)
    fig = Figure(figsize=(1.4 * k + 2.2, 1.2 * k + 1.8), dpi=110)
    ax = fig.subplots()
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{100 * frac[i, j]:.0f}%",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
                fontsize=9,
            )
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_roc(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    aucs: Sequence[float] | None = None,
    title: str = "",
) -> Path:
    """One-vs-rest ROC curve per class (classes absent from `labels` are skipped), as PNG."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    fig = Figure(figsize=(5.0, 4.6), dpi=110)
    ax = fig.subplots()
    for c, name in enumerate(class_names):
        pos = labels == c
        if not pos.any() or pos.all():
            continue
        fpr, tpr = roc_curve(probs[:, c], pos)
        auc = f" (AUC {aucs[c]:.3f})" if aucs is not None and not math.isnan(aucs[c]) else ""
        ax.plot(fpr, tpr, label=f"{name}{auc}")  # straight segments: tied scores give diagonal steps
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title or "ROC, one vs rest")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _aucs(result: EvalResult) -> list[float]:
    return [result.metrics[f"auc_{n}"] for n in result.class_names]


def _json_safe(x: Any) -> Any:
    """NaN -> None so the files are strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_fold(out_dir: str | Path, fold: int, result: EvalResult, extra: dict[str, Any] | None = None) -> Path:
    """`fold_<k>/metrics.json` (with the validation predictions), `confusion.png` and `roc.png`; returns the folder.

    `extra` (e.g. `{"best_epoch": 12, "checkpoint": "..."}`) is stored in the JSON beside the metrics.
    """
    d = Path(out_dir) / f"fold_{fold}"
    d.mkdir(parents=True, exist_ok=True)
    data = {"fold": fold, **(extra or {}), **result.to_json(with_predictions=True)}
    (d / "metrics.json").write_text(json.dumps(_json_safe(data), indent=1))
    plot_confusion(result.confusion, result.class_names, d / "confusion.png", f"fold {fold}")
    plot_roc(result.probs, result.labels, result.class_names, d / "roc.png", _aucs(result), f"fold {fold}, ROC")
    return d


def format_mean_std(stats: dict[str, float], digits: int = 3) -> str:
    """`0.912 ± 0.031` (std omitted when undefined)."""
    if math.isnan(stats["mean"]):
        return "n/a"
    if math.isnan(stats["std"]):
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def _tables(results: Sequence[EvalResult], summary: dict[str, dict[str, float]], pool: EvalResult) -> list[str]:
    names = results[0].class_names
    lines = [
        "## Per fold",
        "",
        "| fold | images | " + " | ".join(t for _, t in _MAIN) + " |",
        "|---:|---:|" + "---:|" * len(_MAIN),
    ]
    for k, r in enumerate(results):
        lines.append(f"| {k} | {int(r.metrics['count'])} | " + " | ".join(_fmt(r.metrics[m]) for m, _ in _MAIN) + " |")
    lines.append("| **mean ± std** | | " + " | ".join(format_mean_std(summary[m]) for m, _ in _MAIN) + " |")
    lines.append(
        "| pooled (out of fold) | "
        + f"{int(pool.metrics['count'])} | "
        + " | ".join(_fmt(pool.metrics[m]) for m, _ in _MAIN)
        + " |"
    )
    lines += [
        "",
        "## Per class (mean ± std over folds)",
        "",
        "| class | sensitivity | specificity | F1 | AUC (one vs rest) |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in names:
        lines.append(
            f"| {n} | "
            + " | ".join(format_mean_std(summary[f"{m}_{n}"]) for m in ("sensitivity", "specificity", "f1", "auc"))
            + " |"
        )
    cm = pool.confusion
    lines += [
        "",
        "## Pooled confusion matrix (rows true, columns predicted)",
        "",
        "| true \\ predicted | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    lines += [f"| {n} | " + " | ".join(str(int(v)) for v in cm[i]) + " |" for i, n in enumerate(names)]
    return lines


def write_summary(
    out_dir: str | Path,
    results: Sequence[EvalResult],
    title: str = "Cross-validation",
    notes: dict[str, Any] | None = None,
    fold_extra: Sequence[dict[str, Any]] | None = None,
    sections: Sequence[str] = (),
) -> Path:
    """Write `summary.md`, `cv_metrics.json` and the pooled plots for the folds' validation results.

    Args:
        out_dir: the run folder.
        results: one `EvalResult` per fold (from the best checkpoint), in fold order.
        title: the Markdown heading.
        notes: `key: value` lines shown above the tables (data, duplicates, model, recipe, world size...).
        fold_extra: per-fold extras (best epoch, checkpoint path) stored in `cv_metrics.json`.
        sections: Markdown lines put first, under the notes (e.g. `honest_lines`: test split, intervals).

    Returns:
        The path of `summary.md`.
    """
    if not results:
        raise ValueError("write_summary needs at least one fold result")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_folds(results)
    pool = pooled(results)
    plot_confusion(pool.confusion, pool.class_names, out / "confusion_pooled.png", "all folds (out of fold)")
    plot_roc(
        pool.probs, pool.labels, pool.class_names, out / "roc_pooled.png", _aucs(pool), "all folds (out of fold), ROC"
    )
    data = {
        "folds": [{**(fold_extra[k] if fold_extra else {}), **r.to_json()} for k, r in enumerate(results)],
        "mean_std": summary,
        "pooled": pool.to_json(),
        "notes": notes or {},
        "pooled_bootstrap_95": bootstrap_ci(pool.probs, pool.labels),
    }
    (out / "cv_metrics.json").write_text(json.dumps(_json_safe(data), indent=1, default=str))
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in (notes or {}).items()]
    lines += [
        "",
        f"{len(results)} folds; std is the sample standard deviation across folds; pooled = all "
        "folds' validation predictions together.",
        "",
    ]
    lines += list(sections)
    lines += _tables(results, summary, pool)
    lines += ["", "Plots: `confusion_pooled.png`, `roc_pooled.png`, and `fold_<k>/` for each fold.", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def format_ci(ci: dict[str, float], digits: int = 3) -> str:
    """`0.842 [0.801, 0.880]` from a `bootstrap_ci` entry."""
    return f"{_fmt(ci['value'], digits)} [{_fmt(ci['low'], digits)}, {_fmt(ci['high'], digits)}]"


def _row(label: str, values: dict[str, float] | dict[str, dict[str, float]]) -> str:
    cells = [format_ci(values[m]) if isinstance(values[m], dict) else _fmt(values[m]) for m, _ in _MAIN]
    return f"| {label} | " + " | ".join(cells) + " |"


def honest_lines(
    best: Sequence[EvalResult],
    last: Sequence[EvalResult],
    test_ensemble: EvalResult | None = None,
    test_folds: Sequence[EvalResult] = (),
    n_boot: int = 1000,
) -> list[str]:
    """The headline table: held-out test (fold ensemble, each fold's model) with 95% bootstrap intervals, then the
    cross-validation scores, best epoch (optimistic: picked on the same fold) beside the last epoch."""
    head = ["| | " + " | ".join(t for _, t in _MAIN) + " |", "|---|" + "---:|" * len(_MAIN)]
    lines: list[str] = []
    if test_ensemble is not None:
        ci = bootstrap_ci(test_ensemble.probs, test_ensemble.labels, BOOTSTRAP_METRICS, n_boot)
        lines += ["## Held-out test split (never seen by training or checkpoint selection)", "", *head]
        lines.append(_row(f"ensemble of {len(test_folds)} fold models (mean softmax), 95% CI", ci))
        lines += [_row(f"fold {k} model alone", r.metrics) for k, r in enumerate(test_folds)]
        lines += [f"\n{int(test_ensemble.metrics['count'])} test images; intervals: {n_boot} bootstrap resamples.", ""]
    pool_best, pool_last = pooled(best), pooled(last)
    lines += ["## Cross-validation (out of fold)", "", *head]
    lines.append(_row("best epoch per fold, pooled (optimistic: picked on that fold), 95% CI",
                      bootstrap_ci(pool_best.probs, pool_best.labels, BOOTSTRAP_METRICS, n_boot)))  # fmt: skip
    lines.append(_row("last epoch per fold, pooled, 95% CI",
                      bootstrap_ci(pool_last.probs, pool_last.labels, BOOTSTRAP_METRICS, n_boot)))  # fmt: skip
    sb, sl = summarize_folds(best), summarize_folds(last)
    lines.append("| best epoch, mean ± std over folds | " + " | ".join(format_mean_std(sb[m]) for m, _ in _MAIN) + " |")
    lines.append("| last epoch, mean ± std over folds | " + " | ".join(format_mean_std(sl[m]) for m, _ in _MAIN) + " |")
    return lines + [""]
