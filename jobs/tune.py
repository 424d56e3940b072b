"""Optuna search over a trainer's hyper-parameters: one worker per launch, any number of workers per study.

    python -m jobs.tune --task classifier --config jobs/configs/classifier_demo.yaml --data data/us \\
        --trials 20 --study cls_demo [--storage URL] [--sampler tpe|gp] [--pruner median|sha|hyperband|none] \\
        [--space SPACE.yaml] [--timeout S]
    python -m jobs.tune --task unet --config jobs/configs/unet_lung.yaml --trials 4 --study S --storage S.journal
    horovodrun -np 2 python -m jobs.tune ...          # each trial trained by 2 ranks with the same parameters
    sbatch slurm/tune_array.sh                        # 8 single-GPU workers on one study

Flags this job does not know go to the trainer's config (`--data`, `--epochs`, ...), over `--config`. Re-running
the same command continues the study (load_if_exists); trials a killed worker left RUNNING are failed and queued
again. Trials run in STUDY_DIR/trials/trial_<n> (default STUDY_DIR: runs/tune/<study>). Then
`python -m jobs.tune_report --study S --storage URL --out DIR` writes best.yaml for the trainers' `--config`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvdtrain import dist, parse_config
from tuning.objective import RunOptions, TrialResult, config_fields, run_worker
from tuning.report import summary_line
from tuning.space import SpaceError, default_space, load_space
from tuning.study import (
    PRUNERS,
    SAMPLERS,
    StudyError,
    claim_worker,
    count_trials,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    parse_storage,
    reclaim_orphans,
    worker_seed,
)
from tuning.tasks import TASKS, Task, make_task


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.tune",
        allow_abbrev=False,  # a trainer flag must never be taken for an abbreviation of one of ours
        description=__doc__.splitlines()[0],
        epilog="Other flags are the trainer's (python -m jobs.train_unet --help, jobs.train_classifier --help).",
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="which trainer's recipe to tune")
    p.add_argument("--config", help="the trainer's base YAML config; trial parameters are set over it")
    p.add_argument("--trials", type=int, required=True, help="trials this worker trains")
    p.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    p.add_argument("--max-trials", type=int, help="stop once the study holds this many trials (all workers)")
    p.add_argument("--study", required=True, help="study name (shared by every worker of the study)")
    p.add_argument("--storage", help="RDB URL, journal:PATH or a file path (default: sqlite in the study folder)")
    p.add_argument("--study-dir", help="trial run folders, splits, worker locks (default: runs/tune/<study>)")
    p.add_argument("--space", help="search-space YAML (default: the task's built-in space)")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="TPE (multivariate, constant liar) or GP")
    p.add_argument("--startup-trials", type=int, default=10, help="random trials before the sampler models")
    p.add_argument("--sampler-seed", type=int, default=0, help="base seed; each worker derives its own from it")
    p.add_argument("--worker-id", type=int, help="this worker's id (default: SLURM_ARRAY_TASK_ID or first free)")
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="stop poor trials early, per epoch")
    p.add_argument("--pruner-startup", type=int, default=5, help="median pruner: trials finished before pruning")
    p.add_argument("--pruner-warmup", type=int, default=0, help="median pruner: epochs before a trial is judged")
    p.add_argument("--heartbeat", type=int, default=60, help="RDB heartbeat seconds (0: off); dead after 2x")
    p.add_argument("--max-retry", type=int, default=3, help="re-queues of a killed or preempted trial")
    p.add_argument("--tune-fold", type=int, default=0, help="classifier: outer fold whose training part is tuned on")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each trial's checkpoints/")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no storage, no training)")
    return p


def _plan_lines(args, cfg, space, storage_spec, study_dir: Path, direction: str, monitor: str) -> list[str]:
    return [
        f"study {args.study} ({direction} {monitor}); storage: {storage_spec.describe()}; folder {study_dir}",
        f"sampler {args.sampler} ({args.startup_trials} start-up trials), pruner {args.pruner}; "
        f"{args.trials} trial(s) here, {cfg.epochs} epoch(s) each",
        f"space: {space.describe()}",
    ]


def _open(args, cfg, space, storage_spec, study_dir: Path, direction: str, monitor: str, parser):
    """Rank 0: this worker's id and seed, the study (created or continued), its own dead trials re-queued."""
    study_dir.mkdir(parents=True, exist_ok=True)
    attrs = {"task": args.task, "monitor": monitor, "base_config": config_fields(cfg), "space": space.to_dict()}
    try:
        worker = claim_worker(study_dir, args.worker_id)
        storage = open_storage(storage_spec, args.heartbeat, None, args.max_retry)
        worker.seed = worker_seed(args.sampler_seed, worker.id, count_trials(storage, args.study))
        sampler = make_sampler(args.sampler, worker.seed, args.startup_trials)
        pruner = make_pruner(args.pruner, cfg.epochs, args.pruner_startup, args.pruner_warmup)
        study = open_study(args.study, storage, sampler, pruner, direction, attrs)
    except StudyError as e:
        parser.error(str(e))
    for line in _plan_lines(args, cfg, space, storage_spec, study_dir, direction, monitor):
        print(line, flush=True)
    print(f"worker {worker.id} ({worker.key}), sampler seed {worker.seed}", flush=True)
    saved, now = study.user_attrs.get("base_config", {}), attrs["base_config"]
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        print(f"note: base config differs from the study's first worker in {', '.join(changed)}", flush=True)
    orphans = reclaim_orphans(study, worker, args.max_retry)
    if orphans:
        print(f"trial(s) {orphans} of this worker were left RUNNING by a killed run: failed, queued again", flush=True)
    return study, worker


def main(argv: list[str] | None = None, task: Task | None = None) -> list[TrialResult]:
    """Run one worker; `task` replaces the built-in task object (tests wrap it to watch every rank)."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    task = task or make_task(args.task, args.tune_fold)
    cfg = parse_config(task.config_cls, [*(["--config", args.config] if args.config else []), *rest])
    try:
        space = load_space(args.space, task.config_cls) if args.space else default_space(args.task, task.config_cls)
    except SpaceError as e:
        parser.error(str(e))
    study_dir = Path(args.study_dir or Path("runs") / "tune" / args.study)
    storage_spec = parse_storage(args.storage, study_dir)
    monitor, mode = task.monitor(cfg)
    direction = "maximize" if mode == "max" else "minimize"
    plan = (args, cfg, space, storage_spec, study_dir, direction, monitor)
    if args.dry_run:
        print("dry run: nothing trained\n" + "\n".join(_plan_lines(*plan)))
        return []
    dist.init(cfg.threads or None, cfg.stall_timeout)
    study, worker = _open(*plan, parser) if dist.is_main() else (None, None)
    dist.print0(task.prepare(cfg, study_dir))
    opts = RunOptions(args.trials, study_dir, args.timeout, args.max_trials, args.max_retry, args.keep_checkpoints)
    results = run_worker(task, cfg, space, opts, study, worker)
    if study is not None:
        print(summary_line(study), flush=True)
        worker.release()
    return results


if __name__ == "__main__":
    main()
