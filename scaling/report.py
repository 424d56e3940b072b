"""The scaling report: a table of real, simulated and predicted runs against GPUs, in Markdown and CSV, and two plots.

Written under `out_dir`::

    scaling.md          the table, the definitions, the prediction assumptions and the calibration
    scaling.csv         one row per run folder and per predicted GPU count (all runs, none averaged)
    time_speedup.png    time per epoch and speedup against GPUs (log2 axes) with the ideal lines
    dice_relative.png   best Dice relative to 1 GPU against GPUs, with the source study's reference points

Definitions: speedup = t_1 / t_N with t_1 the mean epoch time of the real 1-GPU runs (for predicted rows, the same
profile's 1-GPU prediction); efficiency = speedup / N; Dice relative = best Dice / mean best Dice of the 1-GPU runs;
epochs to target = epoch index + 1 of the first validation Dice >= target. Weak-scaling runs (batch per GPU fixed)
and strong-scaling runs (a fixed `--global-batch`, as the trainer records in summary.json) are compared with the
1-GPU runs of their own mode and drawn as separate curves: colour = mode, marker = real / simulated / predicted. A
simulated run trains N GPUs' worth of batches on one process, so its wall time says nothing about N GPUs: its time
columns are left empty. Several runs at one GPU count and kind are all kept in the CSV; the plots draw their mean
(and each run faintly).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from . import perfmodel
from .runs import (
    RunRecord,
    expand_run_dirs,
    grad_bytes_from_checkpoint,
    load_run,
    measurement,
    small_allreduces_per_step,
)

__all__ = [
    "COLUMNS",
    "STUDY_REFERENCE",
    "ModelInputs",
    "StrongInputs",
    "Report",
    "build_rows",
    "format_markdown",
    "inputs_from_runs",
    "make_report",
    "model_check",
    "model_inputs",
    "plot_dice_relative",
    "plot_time_speedup",
    "strong_inputs",
    "write_csv",
]

# The source study: 1-GPU Dice kept up to 8 GPUs, ~95% at 16 and 32, ~85% at 64.
STUDY_REFERENCE = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 0.95, 32: 0.95, 64: 0.85}
ISSUE_BAR = 0.98  # issue 6: simulated runs keep >= 98% of the 1-GPU Dice at every count
COLUMNS = (
    "gpus",
    "kind",
    "scaling",
    "source",
    "world_size",
    "simulate_gpus",
    "global_batch",
    "time_per_epoch_s",
    "speedup",
    "efficiency",
    "best_dice",
    "dice_rel",
    "epochs_to_target",
    "wall_epoch_s",
    "comm_fraction",
    "note",
)
_KIND_ORDER = {"real": 0, "simulated": 1, "predicted": 2}
_MODE_ORDER = {"weak": 0, "strong": 1}
_MODE_COLOURS = {"weak": "C0", "strong": "C3"}  # measured runs: colour = scaling mode, marker = kind
_KIND_STYLE = {"real": ("o", ""), "simulated": ("s", "-")}  # real: points only (1-2 GPUs); simulated: the curve
_PRED_COLOURS = ("C2", "C4", "C5", "C6", "C8")
_PRED_LINES = {"weak": "--", "strong": "-."}


@dataclass(frozen=True)
class ModelInputs:
    """The numbers a prediction starts from, and where each came from."""

    compute_step_s: float
    grad_bytes: float
    samples_per_epoch: float
    batch_per_gpu: int
    accum: int
    measured_on: str | None  # profile the compute time was measured on; None: taken as on the target
    small_allreduces: float = 0.0  # latency-bound collectives per step besides the gradients
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StrongInputs:
    """What a strong-scaling prediction starts from: the real strong-scaling runs at their fewest GPUs."""

    compute_per_sample_s: float
    global_batch: int
    max_batch_per_gpu: int  # their per-GPU micro-batch: the cap the trainer split the global batch with
    source: str


@dataclass
class Report:
    """What `make_report` produced."""

    rows: list[dict[str, Any]]
    target: float | None
    baseline_dice: float | None
    baseline_time: float | None
    assumptions: list[str]
    files: list[Path]
    markdown: str
    model_check: list[str] = field(default_factory=list)  # the calibration's errors, in and out of sample
    calibration: perfmodel.Calibration | None = None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _compute_step(run: RunRecord) -> float | None:
    if run.epoch_time_s is None or not run.steps_per_epoch:
        return None
    return (run.epoch_time_s - (run.comm_s or 0.0)) / run.steps_per_epoch


def model_inputs(
    runs: Sequence[RunRecord],
    step_time: float | None = None,
    grad_bytes: float | None = None,
    samples: float | None = None,
    batch: int | None = None,
    measured_on: str = "cpu_this_machine",
) -> ModelInputs:
    """Prediction inputs from the real 1-GPU runs (or the smallest real run), each overridable.

    Weak-scaling runs are preferred when both modes are present: the weak prediction grows the global batch from
    their per-GPU batch (`strong_inputs` gives the strong-scaling one).

    Raises:
        ValueError: an input is neither given nor found in the runs (the message names the flag to pass).
    """
    runs = [r for r in runs if r.scaling == "weak"] or list(runs)
    real = sorted((r for r in runs if r.kind == "real"), key=lambda r: r.gpus)
    ref = [r for r in real if r.gpus == real[0].gpus] if real else []
    sources: dict[str, str] = {}
    names = ", ".join(r.name for r in ref) or "none"
    if step_time is not None:
        compute, on = step_time, None
        sources["compute"] = "--step-time, taken as measured on the target GPU"
    else:
        compute, on = _mean([_compute_step(r) for r in ref]), measured_on
        sources["compute"] = f"mean (epoch time - comm) / steps of real run(s) {names}, measured on {measured_on}"
        if ref and ref[0].gpus > 1:
            sources["compute"] += f" (no 1-GPU run: taken from {ref[0].gpus}-GPU runs)"
    if grad_bytes is None:
        grad_bytes, sources["grad_bytes"] = _grad_bytes(ref or real)
    else:
        sources["grad_bytes"] = "--grad-bytes"
    if samples is None:
        samples = _mean([r.samples_per_epoch for r in ref])
        sources["samples"] = f"train samples per epoch of {names}"
    else:
        sources["samples"] = "--samples"
    accum = ref[0].accum if ref else 1
    if batch is None:
        batch = ref[0].batch_size_per_gpu if ref else None
        sources["batch"] = f"batch_size_per_gpu of {names}"
    else:
        sources["batch"] = "--batch"
    missing = [
        flag
        for flag, v in (
            ("--step-time", compute),
            ("--grad-bytes", grad_bytes),
            ("--samples", samples),
            ("--batch", batch),
        )
        if not v
    ]
    if missing:
        raise ValueError(
            f"cannot predict: no value for {', '.join(missing)} in the run folders (real runs: {names}); pass "
            + " ".join(missing)
        )
    small = small_allreduces_per_step({**ref[0].config, **ref[0].summary}) if ref else 0.0
    sources["small_allreduces"] = f"config of {names} (hvdtrain step flags, global-batch Dice)"
    return ModelInputs(float(compute), float(grad_bytes), float(samples), int(batch), accum, on, small, sources)


def strong_inputs(runs: Sequence[RunRecord]) -> StrongInputs | None:
    """Compute per sample, global batch and per-GPU cap of the real strong-scaling runs at their fewest GPUs."""
    real = sorted((r for r in runs if r.kind == "real" and r.scaling == "strong"), key=lambda r: r.gpus)
    ref = [r for r in real if r.gpus == real[0].gpus and _compute_step(r) is not None] if real else []
    if not ref:
        return None
    per_sample = _mean([_compute_step(r) / (r.batch_size_per_gpu * r.accum) for r in ref if r.batch_size_per_gpu])
    if per_sample is None:
        return None
    names = ", ".join(r.name for r in ref)
    return StrongInputs(per_sample, ref[0].global_batch, ref[0].batch_size_per_gpu, f"strong-scaling run(s) {names}")


def _grad_bytes(runs: Sequence[RunRecord]) -> tuple[float | None, str]:
    """Gradient bytes of the first run that records them (summary/config, else its checkpoint), and from where."""
    for r in runs:
        found = r.grad_bytes if r.grad_bytes is not None else grad_bytes_from_checkpoint(r)
        if found is not None:
            return found, f"run {r.name} (summary/config grad_bytes or checkpoint parameters)"
    return None, "not found"


def model_check(
    runs: Sequence[RunRecord], grad_bytes: float | None = None, fit_ranks: Sequence[int] | None = (1,)
) -> tuple[perfmodel.Calibration | None, list[str]]:
    """Calibrate cpu_this_machine on the real runs at `fit_ranks` and predict every real run's epoch time.

    Returns the calibration (None when it cannot be made) and its lines: fitted numbers, the error per run, the
    in-sample error and the out-of-sample error against the 15% target.
    """
    real = [r for r in runs if r.kind == "real" and r.epoch_time_s is not None and r.comm_s is not None]
    # Strong-scaling runs first: perfmodel.calibrate calls a held-out run "strong" when it has the global batch of
    # the first fitted run at the fewest ranks, so that run must be a strong-scaling one for the strong 2-rank run
    # to be reported apart from the weak one (the fit itself does not depend on the order).
    real = sorted((r for r in real if r.steps_per_epoch), key=lambda r: r.scaling != "strong")
    if not real:
        return None, ["model check: no real run with train time_s, comm_s and samples in metrics.jsonl"]
    if grad_bytes is None:
        grad_bytes = _grad_bytes(real)[0]
    if grad_bytes is None:
        return None, ["model check: no gradient bytes in the runs (pass --grad-bytes)"]
    try:
        cal = perfmodel.calibrate("cpu_this_machine", [measurement(r, grad_bytes) for r in real], fit_ranks)
    except ValueError as e:
        return None, [f"model check: {e}"]
    return cal, cal.lines()


def inputs_from_runs(
    run_dirs: Sequence[str | Path],
    fit_ranks: Sequence[int] | None = None,
    step_time: float | None = None,
    grad_bytes: float | None = None,
    samples: float | None = None,
    batch: int | None = None,
) -> tuple[ModelInputs, perfmodel.Calibration | None, list[str]]:
    """Prediction inputs and the calibrated CPU profile from run folders (what `make_report` uses, for one job).

    Returns the inputs (each overridable), the calibration on the real runs at `fit_ranks` (None: all) and its lines.

    Raises:
        RunFolderError, ValueError: as `load_run` and `model_inputs`.
    """
    paths = expand_run_dirs(list(run_dirs))
    if not paths:
        raise ValueError("no run folders given")
    runs = [load_run(p) for p in paths]
    inputs = model_inputs(runs, step_time, grad_bytes, samples, batch)
    cal, lines = model_check(runs, inputs.grad_bytes, fit_ranks)
    return inputs, cal, lines


def _predict(
    profile_name: str,
    inputs: ModelInputs,
    gpus: Sequence[int],
    cal: perfmodel.Calibration | None,
    strong: StrongInputs | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Weak-scaling rows of one profile, then strong-scaling ones when `strong` is given (each row has `scaling`)."""
    profile = perfmodel.get_profile(profile_name)
    lines: list[str] = []
    measured_on = inputs.measured_on
    if profile.name == "cpu_this_machine":
        # This machine's own terms come from its measured real runs; its compute needs no scaling.
        if cal is not None:
            profile = cal.profile
            lines = [f"  latency and bandwidth: {cal.method} (see the model check)"]
        if measured_on == "cpu_this_machine":
            measured_on = None
    args = (inputs.compute_step_s, inputs.grad_bytes, inputs.samples_per_epoch, inputs.batch_per_gpu)
    table = perfmodel.predict_table(
        profile, *args, gpus, inputs.accum, measured_on, small_allreduces=inputs.small_allreduces
    )
    assumptions = perfmodel.assumption_lines(profile, *args, inputs.accum, measured_on)
    assumptions.append(f"small collectives per step besides the gradients: {inputs.small_allreduces:g}")
    assumptions += [f"  source of {k}: {v}" for k, v in inputs.sources.items()] + lines
    if strong is not None:
        fits = [g for g in gpus if strong.global_batch % g == 0]  # a fixed global batch splits over these only
        per_sample, per_update, split_by = strong.compute_per_sample_s, 0.0, ""
        if cal is not None and cal.compute_per_update_s > 0 and cal.compute_per_sample_s:
            # The calibration separated the per-update work from the per-sample work: it does not shrink with N.
            per_sample, per_update = cal.compute_per_sample_s, cal.compute_per_update_s
            split_by = "; per sample and per update as the model check fitted them"
        table += perfmodel.predict_strong_table(
            profile,
            per_sample,
            inputs.grad_bytes,
            inputs.samples_per_epoch,
            strong.global_batch,
            fits,
            strong.max_batch_per_gpu,
            measured_on,
            small_allreduces=inputs.small_allreduces,
            compute_per_update_s=per_update,
        )
        assumptions += perfmodel.strong_assumption_lines(
            strong.global_batch, strong.max_batch_per_gpu, per_sample, per_update
        )
        assumptions.append(f"  source of the strong-scaling inputs: {strong.source}{split_by}")
        if len(fits) < len(gpus):
            skipped = ", ".join(str(g) for g in gpus if g not in fits)
            assumptions.append(f"  not predicted at {skipped} GPUs: the global batch does not split over them")
    return table, assumptions


def _labels(runs: Sequence[RunRecord]) -> list[str]:
    """Folder names, made unique with as many parent folders as needed (e.g. run1/fold_0, run2/fold_0)."""
    for depth in range(1, 1 + max((len(r.path.parts) for r in runs), default=1)):
        labels = ["/".join(r.path.parts[-depth:]) for r in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(r.path) for r in runs]


def build_rows(
    runs: Sequence[RunRecord],
    predictions: dict[str, list[dict[str, Any]]] | None = None,
    target_dice: float | None = None,
) -> tuple[list[dict[str, Any]], float | None, float | None, float | None]:
    """Table rows for the runs and predictions: (rows, target Dice, 1-GPU best Dice, 1-GPU epoch time).

    Each run is compared with the 1-GPU runs of its own scaling mode (all 1-GPU runs when its mode has none); the
    returned target and baselines are those of the first mode present (weak before strong).
    """
    labels = _labels(runs)
    bases = {m: _baselines(runs, m, target_dice) for m in sorted({r.scaling for r in runs}, key=_mode_key)}
    target, base_dice, base_time = next(iter(bases.values()), (target_dice, None, None))
    rows = []
    for r, label in zip(runs, labels):
        row = dict.fromkeys(COLUMNS)
        best = r.best
        r_target, r_dice, r_time = bases[r.scaling]
        row.update(
            gpus=r.gpus,
            kind=r.kind,
            scaling=r.scaling,
            source=label,
            world_size=r.world_size,
            simulate_gpus=r.simulate_gpus,
            global_batch=r.global_batch,
            best_dice=best,
            dice_rel=best / r_dice if best is not None and r_dice else None,
            epochs_to_target=r.epochs_to(r_target) if r_target is not None else None,
            wall_epoch_s=r.epoch_time_s,
            comm_fraction=r.comm_fraction,
            note="",
        )
        if r.kind == "real":
            row["time_per_epoch_s"] = r.epoch_time_s
            if r_time and r.epoch_time_s:
                row["speedup"] = r_time / r.epoch_time_s
                row["efficiency"] = row["speedup"] / r.gpus
        else:
            row["note"] = f"simulated on {r.world_size} process(es): its wall time is no time on {r.gpus} GPUs"
        if r.metric != "dice":
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"Dice column is {r.metric}"
        rows.append(row)
    for name, table in (predictions or {}).items():
        for p in table:
            row = dict.fromkeys(COLUMNS)
            row.update(
                gpus=p["gpus"],
                kind="predicted",
                scaling=p.get("scaling", "weak"),
                source=name,
                global_batch=p["global_batch"],
                time_per_epoch_s=p["epoch_s"],
                speedup=p["speedup"],
                efficiency=p["efficiency"],
                note=f"{p['algorithm']}, {p['nodes']} node(s)"
                + ("; global batch > samples per epoch" if p["steps_per_epoch"] < 1 else ""),
            )
            rows.append(row)
    rows.sort(key=lambda x: (_mode_key(x["scaling"]), x["gpus"], _KIND_ORDER[x["kind"]], str(x["source"])))
    return rows, target, base_dice, base_time


def _mode_key(scaling: str) -> tuple[int, str]:
    return _MODE_ORDER.get(scaling, len(_MODE_ORDER)), scaling


def _baselines(
    runs: Sequence[RunRecord], scaling: str, target_dice: float | None
) -> tuple[float | None, float | None, float | None]:
    """(target Dice, mean best Dice, mean epoch time) of the 1-GPU runs of `scaling` (of any mode if it has none)."""
    ones = [r for r in runs if r.gpus == 1 and r.scaling == scaling] or [r for r in runs if r.gpus == 1]
    base_dice = _mean([r.best for r in ones])
    target = target_dice if target_dice is not None else (0.95 * base_dice if base_dice is not None else None)
    return target, base_dice, _mean([r.epoch_time_s for r in ones])


def _fmt(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return {"time": f"{v:.4g}", "x": f"{v:.2f}", "pct": f"{100 * v:.1f}%", "dice": f"{v:.4f}"}.get(kind, str(v))


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table as Markdown (empty cells as '—')."""
    head = (
        "| GPUs | kind | source | scaling | global batch | time/epoch s | speedup | efficiency | best Dice "
        "| Dice vs 1 GPU | epochs to target | note |\n|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in rows:
        cells = [
            str(r["gpus"]),
            r["kind"],
            str(r["source"]),
            r["scaling"],
            _fmt(r["global_batch"], ""),
            _fmt(r["time_per_epoch_s"], "time"),
            _fmt(r["speedup"], "x"),
            _fmt(r["efficiency"], "pct"),
            _fmt(r["best_dice"], "dice"),
            _fmt(r["dice_rel"], "pct"),
            _fmt(r["epochs_to_target"], "") if r["kind"] != "predicted" else "—",
            r["note"] or "",
        ]
        if r["kind"] != "predicted" and r["epochs_to_target"] is None and r["best_dice"] is not None:
            cells[10] = "not reached"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """All rows with every column of `COLUMNS`; empty cells for values that do not apply."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    return path


def _series(rows: Sequence[dict[str, Any]], key: str) -> dict[tuple[str, str, str], dict[int, list[float]]]:
    """{(kind, label, scaling): {gpus: [values]}}; predicted rows are one series per profile and mode, runs one per
    kind and mode."""
    out: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        v = r.get(key)
        if v is None or not math.isfinite(v):
            continue
        label = r["source"] if r["kind"] == "predicted" else r["kind"]
        out[(r["kind"], label, r.get("scaling") or "weak")][r["gpus"]].append(v)
    return dict(sorted(out.items(), key=lambda kv: (_KIND_ORDER[kv[0][0]], _mode_key(kv[0][2]), kv[0][1])))


def _style(kind: str, scaling: str, i: int) -> tuple[str, str, str]:
    """(marker, colour, line style): measured runs coloured by mode, marked by kind; predictions by profile."""
    if kind in _KIND_STYLE:
        marker, line = _KIND_STYLE[kind]
        return marker, _MODE_COLOURS.get(scaling, "C7"), line
    return "^", _PRED_COLOURS[i % len(_PRED_COLOURS)], _PRED_LINES.get(scaling, ":")


def _name(kind: str, label: str, scaling: str) -> str:
    what = f"predicted, {label}" if kind == "predicted" else (f"{kind} (measured)" if kind == "real" else kind)
    return f"{scaling}: {what}"


def _log2_axis(ax, gpus: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(gpus))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("GPUs")
    ax.grid(True, which="major", alpha=0.3)


def _draw(ax, series: dict[int, list[float]], label: str, style: tuple[str, str, str]) -> tuple[list, list]:
    marker, colour, line = style
    xs = sorted(series)
    means = [sum(series[x]) / len(series[x]) for x in xs]
    size = 8 if not line else 6  # points without a line (real runs) drawn larger
    ax.plot(xs, means, marker=marker, color=colour, linestyle=line or "none", markersize=size, label=label)
    for x in xs:  # each run faintly, when several share a GPU count
        if len(series[x]) > 1:
            ax.scatter([x] * len(series[x]), series[x], marker=marker, color=colour, alpha=0.3, s=14)
    return xs, means


def _profile_index(series_keys) -> dict[str, int]:
    """A colour index per predicted profile, shared by its weak and strong curves."""
    names = list(dict.fromkeys(label for kind, label, _ in series_keys if kind == "predicted"))
    return {n: i for i, n in enumerate(names)}


def plot_time_speedup(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Time per epoch and speedup against GPUs (log2 x), real and predicted per mode, with ideal lines (dotted)."""
    fig = Figure(figsize=(11, 4.6), dpi=110)
    ax_t, ax_s = fig.subplots(1, 2)
    gpus = [r["gpus"] for r in rows] or [1]
    times, speedups = _series(rows, "time_per_epoch_s"), _series(rows, "speedup")
    colour_of = _profile_index(times)
    g = sorted(set(gpus))
    for key, s in times.items():
        kind, label, scaling = key
        style = _style(kind, scaling, colour_of.get(label, 0))
        xs, means = _draw(ax_t, s, _name(*key), style)
        if 1 in s:
            t1 = means[xs.index(1)]
            ax_t.plot(g, [t1 / n for n in g], color=style[1], linestyle=":", linewidth=1)
        if key in speedups:
            _draw(ax_s, speedups[key], _name(*key), style)
    ax_s.plot(g, g, color="black", linestyle=":", linewidth=1, label="ideal (speedup = GPUs)")
    ax_t.plot([], [], color="grey", linestyle=":", label="ideal t1 / GPUs (per series)")
    for ax in (ax_t, ax_s):
        _log2_axis(ax, gpus)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time per training epoch (s)")
    ax_s.set_yscale("log", base=2)
    ax_s.set_ylabel("speedup vs 1 GPU (same mode)")
    sim = " (simulated runs: one process, not timed)" if any(r["kind"] == "simulated" for r in rows) else ""
    ax_t.set_title("time per epoch" + sim, fontsize=10)
    ax_s.set_title("speedup; predicted dashed (weak) / dash-dot (strong)", fontsize=10)
    for ax in (ax_t, ax_s):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right" if ax is ax_t else "upper left")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_dice_relative(rows: Sequence[dict[str, Any]], path: str | Path, metric: str = "Dice") -> Path:
    """Best Dice relative to 1 GPU (%) against GPUs, real and simulated per mode, with the study's reference."""
    fig = Figure(figsize=(6.8, 4.6), dpi=110)
    ax = fig.subplots()
    rel = _series(rows, "dice_rel")
    all_vals = [100.0]
    for key, s in rel.items():
        kind, _, scaling = key
        s100 = {g: [100 * v for v in vs] for g, vs in s.items()}
        _draw(ax, s100, _name(*key), _style(kind, scaling, 0))
        all_vals += [v for vs in s100.values() for v in vs]
    ref_x = sorted(STUDY_REFERENCE)
    ax.plot(ref_x, [100 * STUDY_REFERENCE[x] for x in ref_x], "k--", marker="x", label="source study (weak; reference)")
    ax.axhline(100 * ISSUE_BAR, color="grey", linestyle=":", linewidth=1, label=f"our bar ({ISSUE_BAR:.0%})")
    _log2_axis(ax, [r["gpus"] for r in rows] + ref_x)
    ax.set_ylim(min(80.0, min(all_vals) - 3), max(105.0, max(all_vals) + 2))
    ax.set_ylabel(f"best {metric} relative to 1 GPU of the same mode (%)")
    modes = sorted({k[2] for k in rel}, key=_mode_key)
    ax.set_title(f"{metric} against GPUs: {' and '.join(modes)} scaling", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _markdown(
    runs: Sequence[RunRecord],
    table: str,
    target_text: str,
    how: str,
    headline: Sequence[str],
    check: Sequence[str],
    assumptions: Sequence[str],
) -> str:
    """scaling.md: the table, the headline numbers, the definitions, the model check and the assumptions."""
    shown = sorted({r.metric for r in runs})
    md = [
        "# Scaling report",
        "",
        f"{sum(r.kind == 'real' for r in runs)} real and {sum(r.kind == 'simulated' for r in runs)} simulated run(s)"
        f" ({_mode_counts(runs)}); Dice column: validation {', '.join(shown)}; target Dice {target_text} ({how}).",
        "",
        table,
        "",
        *[f"**{h}**" for h in headline],
        *([""] if headline else []),
        "- speedup = t(1 GPU) / t(N), efficiency = speedup / N; predicted rows against the same profile's 1 GPU.",
        "- Dice vs 1 GPU = best Dice / mean best Dice of the 1-GPU runs of the same scaling mode; epochs to target ="
        " first epoch (1-based) whose validation Dice reaches the target (0.95 x that mode's 1-GPU best by default).",
        "- weak scaling: the batch per GPU is fixed, the global batch grows with the GPUs; strong scaling: the global"
        " batch is fixed (`--global-batch`), the batch per GPU shrinks.",
        "- simulated runs (gradient accumulation on one process) have no N-GPU time: see the predicted rows.",
        "- several runs at one GPU count and kind: all listed here and in scaling.csv; the plots show their mean.",
        "",
        "![time and speedup](time_speedup.png)",
        "",
        "![Dice relative to 1 GPU](dice_relative.png)",
    ]
    if check:
        md += ["", "## Model check: the CPU model fitted on some real runs, predicting the others", "", "```"]
        md += [*check, "```"]
    if assumptions:
        md += ["", "## Prediction assumptions", "", "```", *assumptions, "```"]
    return "\n".join(md) + "\n"


def _mode_counts(runs: Sequence[RunRecord]) -> str:
    modes = sorted({r.scaling for r in runs}, key=_mode_key)
    return ", ".join(f"{sum(r.scaling == m for r in runs)} {m} scaling" for m in modes)


def _headline(predictions: dict[str, list[dict[str, Any]]], cal: perfmodel.Calibration | None) -> list[str]:
    """The report's summary lines: the out-of-sample error, then each profile's efficiency at the most GPUs."""
    lines = [ln for ln in cal.summary_lines() if ln.startswith("out-of-sample")] if cal is not None else []
    for name, table in predictions.items():
        modes = list(dict.fromkeys(t.get("scaling", "weak") for t in table))
        for m in modes:
            last = [t for t in table if t.get("scaling", "weak") == m][-1]
            what = f", {m} scaling" if len(modes) > 1 or m != "weak" else ""
            lines.append(f"predicted efficiency at {last['gpus']} GPUs on {name}{what}: {last['efficiency']:.1%}")
    return lines


def _write(out: Path, rows: Sequence[dict[str, Any]], runs: Sequence[RunRecord], markdown: str) -> list[Path]:
    """scaling.md, scaling.csv and the two plots under `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "scaling.md", write_csv(rows, out / "scaling.csv")]
    files[0].write_text(markdown)
    files.append(plot_time_speedup(rows, out / "time_speedup.png"))
    shown = sorted({r.metric for r in runs})
    files.append(plot_dice_relative(rows, out / "dice_relative.png", "Dice" if shown == ["dice"] else shown[0]))
    return files


def make_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    predict: Sequence[str] = (),
    target_dice: float | None = None,
    metric: str = "dice",
    step_time: float | None = None,
    grad_bytes: float | None = None,
    samples: float | None = None,
    batch: int | None = None,
    measured_on: str = "cpu_this_machine",
    gpus: Sequence[int] = perfmodel.DEFAULT_GPUS,
    fit_ranks: Sequence[int] | None = (1,),
    echo: Callable[[str], None] | None = print,
) -> Report:
    """Read the run folders, check and predict with each profile in `predict`, write the table and plots.

    Args:
        run_dirs: run folders, or folders whose direct subfolders are run folders.
        out_dir: where scaling.md, scaling.csv and the PNGs go (created).
        predict: profile names or YAML/JSON files; cpu_this_machine takes the model check's calibration.
        target_dice: the Dice for "epochs to target"; default 0.95 x the 1-GPU best Dice.
        metric: validation key reported as Dice.
        step_time, grad_bytes, samples, batch: override the prediction inputs taken from the real 1-GPU run.
        measured_on: the profile the runs' compute time was measured on (used to scale it to other GPUs).
        gpus: GPU counts to predict.
        fit_ranks: world sizes of the real runs the CPU model is fitted on (None: all); the other real runs are
            predicted out of sample.
        echo: where the table and assumptions are printed (None: silent).

    Raises:
        RunFolderError: a run folder or its summary.json/metrics.jsonl is missing.
        ValueError: bad run files, no run folders, or prediction inputs that cannot be found.
    """
    paths = expand_run_dirs(list(run_dirs))
    if not paths:
        raise ValueError("no run folders given")
    runs = [load_run(p, metric) for p in paths]
    cal, check = model_check(runs, grad_bytes, fit_ranks)
    predictions: dict[str, list[dict[str, Any]]] = {}
    assumptions: list[str] = []
    if predict:
        inputs = model_inputs(runs, step_time, grad_bytes, samples, batch, measured_on)
        strong = strong_inputs(runs)
        for name in predict:
            table, lines = _predict(name, inputs, gpus, cal, strong)
            predictions[perfmodel.get_profile(name).name] = table
            assumptions += lines + [""]
    rows, target, base_dice, base_time = build_rows(runs, predictions, target_dice)
    headline = _headline(predictions, cal)
    out = Path(out_dir)
    table = format_markdown(rows)
    target_text = f"{target:.4f}" if target is not None else "none (no 1-GPU run and no --target-dice)"
    how = "given" if target_dice is not None else "0.95 x the 1-GPU best"
    markdown = _markdown(runs, table, target_text, how, headline, check, assumptions)
    files = _write(out, rows, runs, markdown)
    if echo is not None:
        assumed = ["", "assumptions:", *assumptions] if assumptions else []
        echo("\n".join([table, "", "model check:", *check, *assumed, "", *headline]))
        echo(f"target Dice {target_text}; wrote {', '.join(str(f) for f in files)}")
    return Report(rows, target, base_dice, base_time, assumptions, files, markdown, check, cal)
