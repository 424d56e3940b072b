"""One tuning worker: trials drawn by rank 0, trained by every rank, reported and pruned once per epoch.

A launch (one process, or N Horovod ranks) works on one trial at a time:

    rank 0: study.ask() -> parameters      --broadcast-->   every rank: config = base + parameters
    every rank: hvdtrain.fit(..., on_epoch_end=EpochReporter)
        rank 0: trial.report(value, epoch); should_prune()   --broadcast-->  every rank raises TrialPruned
    rank 0: study.tell(trial, best value | PRUNED | FAIL)

Only rank 0 talks to the storage; the other ranks never open it. A worker killed mid-trial leaves the trial
RUNNING; the heartbeat (RDB storages) or the worker's own restart (any storage) marks it FAIL and queues its
parameters again; the retry resumes from the killed trial's last checkpoint when there is one.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hvdtrain import RunPaths, checkpoint, dist, to_dict

from .space import SearchSpace, apply_params
from .study import Worker, fail_stale, heartbeat, retry_callback
from .tasks import Task

__all__ = ["RunOptions", "TrialResult", "EpochReporter", "config_fields", "run_worker", "trial_dir"]

# Config fields that describe this launch rather than the recipe; never written into a tuned config.
_LAUNCH_FIELDS = ("run_dir", "resume", "preempt_at_step")
_MAX_DUPLICATE_DRAWS = 10


@dataclass(frozen=True)
class RunOptions:
    """How long a worker runs and what it keeps."""

    n_trials: int  # trials this worker trains (duplicate draws skipped without training do not count)
    study_dir: Path  # trial run folders go to STUDY_DIR/trials/trial_<number>
    timeout: float | None = None  # seconds after which no new trial starts
    max_trials: int | None = None  # stop when the study holds this many complete + pruned + running trials
    max_retry: int = 3  # re-queues of a killed or preempted trial
    keep_checkpoints: bool = False  # keep every trial's checkpoints/ (else deleted once the trial is told)


@dataclass(frozen=True)
class TrialResult:
    """What a worker did with one trial (the same on every rank)."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL | PREEMPTED
    value: float | None
    params: dict[str, Any]
    epochs: int  # validation records seen in this launch
    seconds: float
    run_dir: str
    error: str = ""


def trial_dir(study_dir: Path, number: int) -> Path:
    return Path(study_dir) / "trials" / f"trial_{number:04d}"


def config_fields(cfg: Any) -> dict[str, Any]:
    """The fields of `cfg` that differ from the dataclass defaults (a `--config` YAML that rebuilds `cfg`)."""
    defaults = to_dict(type(cfg)())
    return {k: v for k, v in to_dict(cfg).items() if k not in _LAUNCH_FIELDS and v != defaults.get(k)}


class EpochReporter:
    """`on_epoch_end` for `hvdtrain.fit`: rank 0 reports the validation value, every rank obeys its prune decision.

    The validation record is already reduced over the ranks, so only rank 0 (which holds the trial) reports it.
    """

    def __init__(self, trial: optuna.Trial | None, monitor: str):
        self.trial, self.monitor, self.epochs = trial, monitor, 0
        self.last: float | None = None  # the latest finite value

    def __call__(self, record: dict[str, Any]) -> None:
        self.epochs += 1
        value, epoch = record.get(self.monitor), int(record["epoch"])
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if finite:
            self.last = float(value)
        prune = False
        if self.trial is not None:
            if finite:  # a NaN (e.g. Dice with no scored case) is not reported; pruning decides on the rest
                self.trial.report(float(value), epoch)
            prune = self.trial.should_prune()
        prune = dist.broadcast_object(prune)  # hvd: one decision, taken on rank 0, for every rank
        if prune:
            shown = f"{value:.4g}" if isinstance(value, (int, float)) else value
            raise optuna.TrialPruned(f"pruned after epoch {epoch} ({self.monitor} {shown})")


def _duplicate_of(study: optuna.Study, number: int, params: dict[str, Any]) -> int | None:
    """An earlier live or finished trial with the same parameters (failed trials do not count)."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    for t in study.get_trials(deepcopy=False, states=states):
        if t.number < number and t.params == params:
            return t.number
    return None


def _ask(study: optuna.Study, space: SearchSpace, worker: Worker) -> tuple[optuna.Trial, dict[str, Any], int | None]:
    """A new trial with its parameters: a queued retry first, else a fresh draw that no other trial has."""
    fail_stale(study)  # heartbeat storages: trials of dead workers become FAIL and are queued again
    for draw in range(_MAX_DUPLICATE_DRAWS):
        with warnings.catch_warnings():
            # Heartbeats are driven here (tuning.study.heartbeat) rather than by study.optimize.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        trial.set_user_attr("worker", worker.key)
        trial.set_user_attr("worker_id", worker.id)
        trial.set_user_attr("sampler_seed", worker.seed)
        params = space.suggest(trial)
        retry_of = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retry_of is not None:
            if trial.user_attrs.get("error"):  # copied from the failed trial by the retry callback
                trial.set_user_attr("error", "")
            return trial, params, int(retry_of)
        dup = _duplicate_of(study, trial.number, params)
        if dup is None:
            return trial, params, None
        if draw + 1 < _MAX_DUPLICATE_DRAWS:
            trial.set_user_attr("duplicate_of", dup)
            study.tell(trial, state=TrialState.FAIL)  # no training: the sampler just drew trial `dup` again
    dist.print0(f"trial {trial.number}: still a duplicate of {dup} after {_MAX_DUPLICATE_DRAWS} draws; training it")
    return trial, params, None


def _stop_reason(study: optuna.Study, opts: RunOptions, started: float) -> str | None:
    if opts.timeout is not None and time.monotonic() - started >= opts.timeout:
        return f"timeout of {opts.timeout:g} s reached"
    if opts.max_trials is not None:
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        n = len(study.get_trials(deepcopy=False, states=states))
        if n >= opts.max_trials:
            return f"the study holds {n} trials (--max-trials {opts.max_trials})"
    return None


def _plan(study: optuna.Study, space: SearchSpace, worker: Worker, opts: RunOptions, started: float):
    """Rank 0: (trial, message for every rank)."""
    reason = _stop_reason(study, opts, started)
    if reason:
        return None, {"stop": reason}
    trial, params, retry_of = _ask(study, space, worker)
    root = trial.number if retry_of is None else retry_of
    run_dir = trial_dir(opts.study_dir, root)
    resume = retry_of is not None and checkpoint.find_latest(run_dir) is not None
    if retry_of is None and run_dir.exists():  # left by an earlier study of the same name: keep it, aside
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.old{int(time.time())}"))
    msg = {"stop": None, "number": trial.number, "params": params, "run_dir": str(run_dir), "resume": resume}
    msg["retry_of"] = retry_of
    return trial, msg


def _tell(study, trial, result: TrialResult, summary: dict[str, Any], opts: RunOptions) -> None:
    """Rank 0: attributes for the report, then the trial's end state."""
    trial.set_user_attr("epochs_run", result.epochs)
    trial.set_user_attr("seconds", round(result.seconds, 3))
    for key in ("world_size", "gpus", "global_batch", "steps_per_epoch", "epoch_time_s", "train_samples"):
        if summary.get(key) is not None:
            trial.set_user_attr(key, summary[key])
    if result.error:
        trial.set_user_attr("error", result.error[:1000])
    if result.state == "COMPLETE":
        study.tell(trial, result.value)
    elif result.state == "PRUNED":
        study.tell(trial, state=TrialState.PRUNED)  # Optuna keeps the last reported value
    else:
        study.tell(trial, state=TrialState.FAIL)
        if result.state == "PREEMPTED":  # signalled: its last.pt lets a retry continue where it stopped
            frozen = study._storage.get_trial(trial._trial_id)
            retry_callback(opts.max_retry)(study, frozen)


def _train(task: Task, cfg: Any, reporter: EpochReporter) -> tuple[str, dict[str, Any], str]:
    """(state, summary, error) of one training run; every rank takes the same branch except on a failure."""
    try:
        summary = task.train(cfg, reporter)
    except optuna.TrialPruned as e:
        return "PRUNED", {}, str(e)
    except Exception as e:  # a diverging or misconfigured trial must not end the study
        if dist.info().size > 1:
            raise  # ranks may be out of step after a failure on one of them: end the launch
        return "FAIL", {}, f"{type(e).__name__}: {e}"
    if summary.get("preempted"):
        return "PREEMPTED", summary, "preempted (SIGUSR1/SIGTERM): queued again to resume from last.pt"
    return "COMPLETE", summary, ""


def _run_one(task: Task, base_cfg: Any, msg: dict, trial, study, opts: RunOptions, monitor: str) -> TrialResult:
    cfg = apply_params(base_cfg, msg["params"], run_dir=msg["run_dir"], resume=msg["resume"])
    if trial is not None:
        trial.set_user_attr("config", config_fields(cfg))
        trial.set_user_attr("run_dir", msg["run_dir"])
    reporter = EpochReporter(trial, monitor)
    t0 = time.perf_counter()
    with heartbeat(study, trial):
        try:
            state, summary, error = _train(task, cfg, reporter)
        except BaseException as e:
            if trial is not None:  # Ctrl-C, or a failure with several ranks: record it, then stop
                failed = TrialResult(msg["number"], "FAIL", None, msg["params"], reporter.epochs, 0.0, msg["run_dir"])
                _tell(study, trial, dataclasses.replace(failed, error=f"{type(e).__name__}: {e}"), {}, opts)
            raise
    value = summary.get("best_metric") if state == "COMPLETE" else None
    if state == "COMPLETE" and (value is None or not math.isfinite(value)):
        state, error = "FAIL", f"no finite {monitor} in the summary (best_metric {value})"
    if state == "PRUNED":
        value = reporter.last  # the value it was pruned on (Optuna records it too)
    result = TrialResult(
        msg["number"], state, value, msg["params"], reporter.epochs, time.perf_counter() - t0, msg["run_dir"], error
    )
    if trial is not None:
        _tell(study, trial, result, summary, opts)
        if not opts.keep_checkpoints and state != "PREEMPTED":
            shutil.rmtree(RunPaths(msg["run_dir"]).checkpoints, ignore_errors=True)
    return result


def _describe(result: TrialResult, monitor: str, retry_of: int | None) -> str:
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.params.items())
    value = f" {monitor} {result.value:.4f}" if result.value is not None else ""
    retry = f" (retry of trial {retry_of})" if retry_of is not None else ""
    error = f": {result.error}" if result.error and result.state != "COMPLETE" else ""
    return (
        f"trial {result.number}{retry} {result.state}{value} after {result.epochs} epoch(s), "
        f"{result.seconds:.1f} s [{params}]{error}"
    )


def run_worker(
    task: Task,
    base_cfg: Any,
    space: SearchSpace,
    opts: RunOptions,
    study: optuna.Study | None = None,
    worker: Worker | None = None,
) -> list[TrialResult]:
    """Train up to `opts.n_trials` trials of `study` (every rank calls this; `study`/`worker` on rank 0 only).

    Returns the trials this launch trained, in order, identically on every rank.
    """
    if dist.is_main() and (study is None or worker is None):
        raise ValueError("rank 0 needs the study and its worker identity")
    monitor, _ = task.monitor(base_cfg)
    started = time.monotonic()
    results: list[TrialResult] = []
    while len(results) < opts.n_trials:
        trial, msg = _plan(study, space, worker, opts, started) if dist.is_main() else (None, None)
        msg = dist.broadcast_object(msg)  # hvd: every rank trains the parameters rank 0 drew
        if msg["stop"]:
            dist.print0(f"worker stops: {msg['stop']}")
            break
        result = _run_one(task, base_cfg, msg, trial, study, opts, monitor)
        dist.print0(_describe(result, monitor, msg["retry_of"]))
        results.append(result)
        if result.state == "PREEMPTED":
            break
        gc.collect()  # the trial's model and optimizer: freed before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results
