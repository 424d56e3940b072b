"""Carry tuned parameters to N GPUs: one trainer config per GPU count, with what changed and why.

    python -m jobs.scale --best runs/tune/S/report/best.yaml --gpus 1,2,4,8,16,32,64 --rule linear --warmup 5 \\
        --out runs/tune/S/scaled [--keep-global-batch] [--render] [--launch-local]
    python -m jobs.scale --best ... --gpus 1,2,4,8 --rule table --lr-table jobs/configs/lr_table_mlperf_unet3d.yaml \\
        --out runs/tune/S/scaled_table [--keep-global-batch]

Writes OUT/<task>_<N>gpu.yaml (best.yaml with batch, accumulation, lr, lr_rule, warmup and epochs set for N GPUs)
and OUT/plan.md. `--rule table` takes the peak LR and warmup of each count's global batch from a
batch -> (LR, warmup) table (`--lr-table`, else the tuned config's `lr_table`) and writes the table into each
config. `--render` also writes OUT/<task>_<N>gpu.sh for counts above 2 from the cluster templates
(slurm/catalog.py, slurm/specs/site.yaml); `--launch-local` trains the counts up to 2 here with horovodrun.
The tuned GPU count, global batch and training-set size come from best_meta.json beside best.yaml
(jobs.tune_report writes it); --tuned-gpus and --train-samples override them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from hvdtrain import parse_config
from hvdtrain.batching import BatchingError, lr_table_row
from tuning.tasks import TASKS
from tuning.transfer import RULES, Plan, Reference, ScaleError, plan_for

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.scale", description=__doc__.splitlines()[0])
    p.add_argument("--best", required=True, help="best.yaml from jobs.tune_report")
    p.add_argument("--gpus", required=True, help="comma-separated GPU counts, e.g. 1,2,4,8")
    p.add_argument("--rule", default="linear", choices=RULES, help="peak-LR rule for a larger global batch")
    p.add_argument("--warmup", type=float, default=5.0, help="warmup epochs when the peak LR grows (not --rule table)")
    p.add_argument(
        "--lr-table", nargs="+", help="--rule table: rows G:LR:WARMUP or a YAML of them (default: best.yaml's lr_table)"
    )
    p.add_argument("--keep-global-batch", action="store_true", help="split the tuned global batch over the GPUs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", choices=sorted(TASKS), help="trainer (default: from best_meta.json)")
    p.add_argument("--tuned-gpus", type=int, help="GPUs the study ran on (default: best_meta.json, else 1)")
    p.add_argument("--train-samples", type=int, help="training samples per epoch (default: best_meta.json)")
    p.add_argument("--render", action="store_true", help="cluster scripts for counts above 2")
    p.add_argument("--scheduler", default="slurm", choices=("slurm", "pbs"), help="with --render")
    p.add_argument("--launch-local", action="store_true", help="train counts up to 2 here (horovodrun --gloo)")
    return p.parse_args(argv)


def _gpu_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ScaleError(f"--gpus takes comma-separated whole numbers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ScaleError(f"--gpus needs GPU counts of at least 1, got {text!r}")
    return sorted(set(counts))


def _reference(args: argparse.Namespace) -> tuple[str, dict, Reference]:
    best = Path(args.best)
    meta_path = best.with_name("best_meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    task = args.task or meta.get("task")
    if task not in TASKS:
        raise ScaleError(f"{best}: say which trainer it is for with --task (no best_meta.json task beside it)")
    raw = yaml.safe_load(best.read_text()) or {}
    cfg = parse_config(TASKS[task].config_cls, ["--config", str(best)])
    ref = Reference(
        gpus=args.tuned_gpus or int(meta.get("tuned_gpus") or 1),
        batch_size_per_gpu=cfg.batch_size_per_gpu,
        accum=cfg.accum,
        lr=cfg.lr,
        lr_rule=cfg.lr_rule,
        warmup_epochs=cfg.warmup_epochs,
        epochs=cfg.epochs,
        train_samples=args.train_samples or meta.get("train_samples"),
        lr_table=cfg.lr_table,
    )
    if cfg.lr_table:  # the trials' warmup was the table's row for their global batch (hvdtrain.batching.resolve)
        try:
            ref = replace(ref, warmup_epochs=lr_table_row(cfg.lr_table, ref.global_batch)[2])
        except BatchingError as e:
            raise ScaleError(f"{best}: {e}") from None
    return task, raw, ref


def _write_config(path: Path, raw: dict, plan: Plan, task: str, source: Path) -> None:
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    values = {k: v for k, v in {**raw, **plan.changes()}.items() if v is not None}
    header = [f"# {task} on {plan.gpus} GPU(s), carried from {source} by python -m jobs.scale:"]
    header += [f"#   {n}" for n in plan.notes]
    if raw.get("lr_table") and not plan.lr_table:
        header.append(f"#   the tuned lr_table is dropped: the {plan.lr_rule} rule sets the LR")
    body = "".join(
        yaml.safe_dump({k: v}, default_flow_style=None if isinstance(v, list) else False, width=1000)
        for k, v in values.items()
    )
    path.write_text("\n".join(header) + "\n" + body)


def _rel(path: Path) -> str:
    """`path` relative to the repository root when it is inside it (scripts are submitted from the root)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def _render(task: str, gpus: int, config: Path, out: Path, scheduler: str) -> Path:
    from slurm.catalog import SITE_FILE, family_spec
    from slurm.render import render
    from slurm.spec import load_site

    script = out / f"{task}_{gpus}gpu.sh"
    command = f'python -m jobs.train_{task} --config {_rel(config)} --run-dir "$RUN_DIR" --resume'
    spec = family_spec(
        load_site(SITE_FILE), task, gpus, scheduler, name=f"tuned_{task}_{gpus}gpu", command=command,
        script=_rel(script), description=f"tuned {task} recipe on {gpus} GPUs (jobs.scale)",
    )  # fmt: skip
    script.write_text(render(spec, f"the {task} family in slurm/catalog.py and slurm/specs/site.yaml, via jobs.scale"))
    script.chmod(0o755)
    return script


def _launch(task: str, gpus: int, config: Path, out: Path) -> int:
    run_dir = out / f"run_{gpus}gpu"
    cmd = [sys.executable, "-m", f"jobs.train_{task}", "--config", str(config), "--run-dir", str(run_dir), "--resume"]
    if gpus > 1:
        launcher = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
        cmd = [launcher, "-np", str(gpus), "--gloo", *cmd]
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        counts = _gpu_counts(args.gpus)
        task, raw, ref = _reference(args)
    except (ScaleError, FileNotFoundError) as e:
        print(f"scale: error: {e}", file=sys.stderr)
        return 2
    table = args.lr_table or raw.get("lr_table") or raw.get("lr-table")
    if args.rule == "table" and not table:
        print(f"scale: error: --rule table needs --lr-table (rows, a YAML) or lr_table in {args.best}", file=sys.stderr)
        return 2
    plans, skipped = [], []
    for n in counts:
        try:
            plans.append(plan_for(ref, n, args.rule, args.warmup, args.keep_global_batch, table))
        except ScaleError as e:  # the other counts are still written
            skipped.append(str(e))
            print(f"scale: skipped: {e}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "global batch kept" if args.keep_global_batch else f"{args.rule} rule, warmup {args.warmup:g}"
    if args.rule == "table":
        mode = ("global batch kept, " if args.keep_global_batch else "") + "LR and warmup from the table"
    lines = [f"# {task}: tuned on {ref.gpus} GPU(s), global batch {ref.global_batch}, peak LR {ref.peak_lr:.4g}; "
             f"{mode}", "", "| GPUs | global batch | batch/GPU x accum | lr (config) | lr_rule | peak LR | warmup | "
             "epochs | steps/epoch |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for plan in plans:
        config = out / f"{task}_{plan.gpus}gpu.yaml"
        _write_config(config, raw, plan, task, Path(args.best))
        print(f"{config}:\n" + "\n".join(f"  {n}" for n in plan.notes))
        rule = "table" if plan.lr_table else plan.lr_rule
        lines.append(
            f"| {plan.gpus} | {plan.global_batch} | {plan.batch_size_per_gpu} x {plan.accum} | {plan.lr:.4g} | "
            f"{rule} | {plan.peak_lr:.4g} | {plan.warmup_epochs:g} | {plan.epochs} | "
            f"{plan.steps_per_epoch if plan.steps_per_epoch is not None else '?'} |"
        )
        if args.render and plan.gpus > 2:
            print(f"  script: {_render(task, plan.gpus, config, out, args.scheduler)}")
    lines += [f"\nSkipped: {e}" for e in skipped]
    (out / "plan.md").write_text("\n".join(lines) + "\n")
    print(f"plan: {out / 'plan.md'}")
    if args.launch_local:
        for plan in plans:
            if plan.gpus > 2:
                print(f"{plan.gpus} GPUs: not launched here (use --render and submit the script)")
                continue
            rc = _launch(task, plan.gpus, out / f"{task}_{plan.gpus}gpu.yaml", out)
            if rc:
                print(f"scale: error: the {plan.gpus}-GPU run exited {rc}", file=sys.stderr)
                return rc
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
