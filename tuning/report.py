"""What a study found: the best trial as a trainer config, a short summary, and the standard Optuna plots.

`best.yaml` holds every config field of the best trial that differs from the trainer's defaults: the base config
the study was run with (its YAML and flags) with the tuned parameters set over it, so
`python -m jobs.train_<task> --config best.yaml` trains that trial's recipe (flags still override it).
`best_meta.json` beside it records where it came from (trial, value, GPUs and global batch it was tuned at), which
`jobs.scale` reads.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from .errors import TuningError

__all__ = ["ReportError", "state_counts", "summary_line", "best_config", "write_best", "write_plots", "write_report"]

PLOTS = {
    "history.png": "plot_optimization_history",
    "importances.png": "plot_param_importances",
    "parallel.png": "plot_parallel_coordinate",
    "intermediate.png": "plot_intermediate_values",
}


class ReportError(TuningError):
    """A study that cannot be reported yet (no such study, no complete trial)."""


def state_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {s.name.lower(): n for s in TrialState if (n := sum(t.state == s for t in trials))}


def summary_line(study: optuna.Study) -> str:
    counts = state_counts(study)
    text = f"study {study.study_name}: {sum(counts.values())} trials (" + ", ".join(
        f"{k} {v}" for k, v in counts.items()
    )
    text += ")"
    if counts.get("complete"):
        best = study.best_trial
        text += f"; best trial {best.number}: {best.value:.4f} {best.params}"
    return text


def best_config(study: optuna.Study) -> tuple[FrozenTrial, dict[str, Any]]:
    """The best complete trial and its config fields (stored by the objective; else base config + params)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ReportError(f"study {study.study_name} has no complete trial yet ({state_counts(study)})")
    best = study.best_trial
    config = best.user_attrs.get("config")
    if config is None:
        config = {**study.user_attrs.get("base_config", {}), **best.params}
    return best, dict(config)


def write_best(study: optuna.Study, out: Path) -> tuple[Path, Path]:
    """best.yaml (a trainer `--config`) and best_meta.json; returns their paths."""
    best, config = best_config(study)
    attrs, task = best.user_attrs, study.user_attrs.get("task", "?")
    monitor = study.user_attrs.get("monitor", "value")
    gpus = attrs.get("gpus", 1)
    header = [
        f"# Best trial {best.number} of study {study.study_name}: {monitor} {best.value:.6g} "
        f"({study.direction.name.lower()}); tuned on {gpus} GPU(s), global batch {attrs.get('global_batch', '?')}.",
        f"# Train it:  python -m jobs.train_{task} --config best.yaml --run-dir DIR",
        "# On N GPUs: python -m jobs.scale --best best.yaml --gpus 1,2,4,8 --rule linear --warmup 5 --out DIR",
    ]
    out.mkdir(parents=True, exist_ok=True)
    yaml_path = out / "best.yaml"
    # One `field: value` line each (lists inline), as the presets in jobs/configs are written.
    body = "".join(
        yaml.safe_dump({k: v}, default_flow_style=None if isinstance(v, list) else False, width=1000)
        for k, v in config.items()
    )
    yaml_path.write_text("\n".join(header) + "\n" + body)
    meta = {
        "task": task,
        "study": study.study_name,
        "trial": best.number,
        "value": best.value,
        "monitor": monitor,
        "direction": study.direction.name.lower(),
        "params": best.params,
        "tuned_gpus": gpus,
        "world_size": attrs.get("world_size", 1),
        "global_batch": attrs.get("global_batch"),
        "train_samples": attrs.get("train_samples"),
        "steps_per_epoch": attrs.get("steps_per_epoch"),
        "counts": state_counts(study),
    }
    meta_path = out / "best_meta.json"
    meta_path.write_text(json.dumps(meta, indent=1))
    return yaml_path, meta_path


def write_plots(study: optuna.Study, out: Path) -> dict[str, str]:
    """PNG plots (optuna.visualization.matplotlib); returns file -> "ok" or why it was skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    done: dict[str, str] = {}
    for name, fn in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # the matplotlib backend is "experimental"
                ax = getattr(ovm, fn)(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 5)
            fig.savefig(out / name, dpi=100, bbox_inches="tight")
            done[name] = "ok"
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances need 2+ complete trials
            done[name] = f"skipped: {e}"
        finally:
            plt.close("all")
    return done


def write_report(study: optuna.Study, out: Path) -> dict[str, Any]:
    """best.yaml, best_meta.json, trials.csv, the plots and report.md in `out`."""
    yaml_path, meta_path = write_best(study, out)
    rows = ["number,state,value,worker_id,epochs_run,seconds," + ",".join(_param_names(study))]
    for t in study.get_trials(deepcopy=False):
        values = [t.number, t.state.name, "" if t.value is None else t.value, t.user_attrs.get("worker_id", "")]
        values += [t.user_attrs.get("epochs_run", ""), t.user_attrs.get("seconds", "")]
        values += [t.params.get(n, "") for n in _param_names(study)]
        rows.append(",".join(map(str, values)))
    (out / "trials.csv").write_text("\n".join(rows) + "\n")
    plots = write_plots(study, out)
    best, config = best_config(study)
    md = [
        f"# Study {study.study_name}",
        "",
        summary_line(study),
        "",
        f"Best trial {best.number}: `{json.dumps(best.params)}`; config: `best.yaml` ({len(config)} fields).",
        "",
        *[f"- {name}: {status}" for name, status in plots.items()],
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    return {"best": yaml_path, "meta": meta_path, "plots": plots, "trial": best.number, "value": best.value}


def _param_names(study: optuna.Study) -> list[str]:
    names: list[str] = []
    for t in study.get_trials(deepcopy=False):
        names += [n for n in t.params if n not in names]
    return names
