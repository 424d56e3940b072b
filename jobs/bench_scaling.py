"""Dice against GPU count for the large-batch recipe: simulated 1-64 GPUs and real Horovod ranks, then the report.

    python -m jobs.bench_scaling                       # the issue-6 bar, 20-40 min on 2 CPU cores
    python -m jobs.bench_scaling --quick               # smoke run: 1, 2, 4 GPUs, 2 epochs (under a minute)
    python -m jobs.bench_scaling --gpus 1,8,64 --jobs 1 --out runs/bench_scaling-try

On small phantoms (`jobs.make_phantoms --preset demo`, 16 training / 8 validation volumes of 48x48x32) it runs the
real trainer, `python -m jobs.train_unet --config jobs/configs/unet_bench_scaling.yaml`, once per GPU count with
`--simulate-gpus N` (one process, N x gradient accumulation: the N-GPU global batch, LR and number of updates), and
for real under `horovodrun -np R` (jobs._launch) for the rank counts of `--real-ranks` (default 1 and 2). The 1-GPU
point is the real 1-rank run (simulating one GPU is that same run). Everything but the GPU count comes from the preset.
Then `python -m jobs.scaling_report` writes the table and plots (OUT/report) with the `study_p100_edr` prediction,
and this job prints its own table: GPUs, mode, global batch, updates, best validation Dice, Dice relative to
1 GPU, wall time, and whether the bar is met: every simulated count keeps >= 98% of the 1-GPU best Dice.

The recipe (see the preset) keeps a FIXED number of EPOCHS, so 64 GPUs see the same data in 1/64 of the updates
(320 of batch 128 against 20480 of batch 2): the budget under which the source study kept only 85% of its Dice at
64 GPUs, and the one that buys the speedup (a fixed number of updates would make 64 GPUs train 64x the data). AdamW
with the LR scaled by sqrt(GPUs) (Adam's square-root rule), a 5-epoch warmup from the 1-GPU LR and a cosine decay
to 0 make those few large steps count. Tried at 64 GPUs over 100 epochs (best Dice; ~0.92-0.94 at 1 GPU):
LAMB 0.003-0.005 sqrt 0.85-0.87; AdamW 0.002 sqrt (peak 0.016) 0.88; AdamW 0.004 sqrt or 0.0005 linear (peak
0.032) 0.90; a higher peak (AdamW 0.064; LAMB 0.08-0.128, at 24x24x16 patches) or Dice without BCE was less
stable and lower. 160 epochs then took 64 GPUs to the 1-GPU Dice.

Measured (2 shared CPU cores, `python -m jobs.bench_scaling`, 18.6 min; the same figures in 38.5 min on a slower
day): best Dice 0.919 at 1 GPU (real),
0.942 on 2 real ranks, 0.940 / 0.942 / 0.934 / 0.934 / 0.928 / 0.917 simulated at 2 / 4 / 8 / 16 / 32 / 64 GPUs:
99.7% of 1 GPU at 64 (seed 1: 0.936 at 1 GPU, 0.938 at 64). The 2 real ranks took 2.05 s per epoch against 1.16 s
for one: with ~10 ms of compute per step, Gloo's allreduces (gradients, the global-batch Dice, the preemption flag)
cost more than the second core gives on this machine.

Simulated runs are not timed as N GPUs (their wall time is N GPUs' work on one process); they run `--jobs` at a
time with one thread each, while the real runs run alone so that their epoch times are measurements.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs._launch import child_env, horovodrun_cmd

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "unet_bench_scaling.yaml"
BAR = 0.98  # issue 6: every simulated GPU count keeps >= 98% of the 1-GPU best validation Dice
PHANTOMS = ["--preset", "demo", "--n-train", "16", "--n-val", "8", "--n-test", "0", "--shape", "48", "48", "32"]
QUICK_GPUS, QUICK_EPOCHS = "1,2,4", 2


class BenchError(RuntimeError):
    """A run of the benchmark failed or its settings cannot work."""


@dataclass(frozen=True)
class Run:
    """One trainer run: `ranks` Horovod processes, each standing in for `simulate` GPUs."""

    ranks: int
    simulate: int

    @property
    def gpus(self) -> int:
        return self.ranks * self.simulate

    @property
    def mode(self) -> str:
        return "simulated" if self.simulate > 1 else "real"

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.gpus:02d}gpu"


def plan(gpus: list[int], real_ranks: list[int]) -> list[Run]:
    """Real runs first (the 1-rank one is the baseline), then one simulated run per GPU count above 1."""
    real = [Run(r, 1) for r in sorted(set(real_ranks) | {1})]
    return real + [Run(1, g) for g in sorted(set(gpus)) if g > 1]


def check_batches(runs: list[Run], preset: dict, n_train: int) -> None:
    """Every run needs at least one optimizer step per epoch (the sampler drops the ragged tail).

    Raises:
        BenchError: the largest global batch exceeds the patches of one epoch.
    """
    patches = preset["samples_per_volume"] * n_train
    for run in runs:
        global_batch = preset["batch_size_per_gpu"] * run.gpus
        if global_batch > patches:
            raise BenchError(
                f"{run.gpus} GPUs x {preset['batch_size_per_gpu']} patches = global batch {global_batch} is more than "
                f"the {patches} patches of an epoch ({preset['samples_per_volume']} per volume x {n_train} volumes)"
            )


def _call(cmd: list[str], log: Path) -> float:
    """Run `cmd` from the repo root with its output in `log`; returns the wall time in seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise BenchError(f"{' '.join(cmd)} exited {p.returncode} (log {log}):\n{tail}")
    return wall


def train(run: Run, data: Path, out: Path, epochs: int | None) -> dict:
    """One `jobs.train_unet` run; returns its figures (from summary.json) and wall time."""
    run_dir = out / "runs" / run.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a re-run of the same --out starts afresh (the trainer refuses old checkpoints)
    cmd = [sys.executable, "-m", "jobs.train_unet", "--config", str(CONFIG), "--data", str(data)]
    cmd += ["--run-dir", str(run_dir), "--simulate-gpus", str(run.simulate)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if run.ranks > 1:
        cmd = horovodrun_cmd(run.ranks, cmd)
    wall = _call(cmd, out / "logs" / f"{run.name}.log")
    s = json.loads((run_dir / "summary.json").read_text())
    return {
        "gpus": run.gpus,
        "mode": run.mode,
        "ranks": run.ranks,
        "simulate": run.simulate,
        "global_batch": s["global_batch"],
        "updates": s["steps_per_epoch"] * s["epochs"],
        "best_dice": s["best_metric"],
        "best_epoch": s["best_epoch"],
        "final_dice": s["final_metric"],
        "epoch_s": s["epoch_time_s"],
        "wall_s": wall,
        "run_dir": str(run_dir),
    }


def add_relative(rows: list[dict]) -> float:
    """Dice relative to the real 1-GPU run, in place; returns that baseline Dice."""
    base = next(r["best_dice"] for r in rows if r["gpus"] == 1 and r["mode"] == "real")
    for r in rows:
        r["dice_rel"] = r["best_dice"] / base if base else float("nan")
    return base


def verdict(rows: list[dict]) -> tuple[bool, str]:
    """Whether every simulated count keeps BAR of the 1-GPU Dice, and a one-line account of it."""
    sim = [r for r in rows if r["mode"] == "simulated"]
    if not sim:
        return False, "no simulated runs: the bar cannot be judged"
    worst = min(sim, key=lambda r: r["dice_rel"])
    met = all(r["dice_rel"] >= BAR for r in sim)
    failing = [str(r["gpus"]) for r in sim if r["dice_rel"] < BAR]
    detail = f"lowest {worst['dice_rel']:.1%} at {worst['gpus']} GPUs"
    return met, f"{'met' if met else 'NOT met'} ({detail}" + ("" if met else f"; below at {', '.join(failing)}") + ")"


def model_check_lines(report_md: str) -> list[str]:
    """The report's out-of-sample lines (the CPU model fitted on 1 rank, predicting the 2-rank epoch time)."""
    return [ln.strip("*") for ln in report_md.splitlines() if ln.startswith("**out-of-sample error")]


def run_report(rows: list[dict], out: Path, predict: str) -> tuple[Path, list[str]]:
    """`jobs.scaling_report` over the runs into OUT/report; returns that folder and its out-of-sample lines."""
    report_dir = out / "report"
    cmd = [sys.executable, "-m", "jobs.scaling_report", *(r["run_dir"] for r in rows), "--out", str(report_dir)]
    if predict:
        cmd += ["--predict", predict]
    _call(cmd, out / "logs" / "scaling_report.log")
    return report_dir, model_check_lines((report_dir / "scaling.md").read_text())


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'GPUs':>4} | {'mode':<9} | {'ranks x sim':>11} | {'global batch':>12} | {'updates':>7} | "
        f"{'best Dice':>9} | {'vs 1 GPU':>8} | {'s/epoch':>7} | {'wall s':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["gpus"], r["mode"] != "real")):
        epoch = f"{r['epoch_s']:>7.2f}" if r["mode"] == "real" else f"{'—':>7}"  # a simulated epoch is no N-GPU time
        lines.append(
            f"{r['gpus']:>4} | {r['mode']:<9} | {r['ranks']:>5} x {r['simulate']:<3} | {r['global_batch']:>12} | "
            f"{r['updates']:>7} | {r['best_dice']:>9.4f} | {r['dice_rel']:>7.1%} | {epoch} | {r['wall_s']:>6.0f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.bench_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="output folder (default runs/bench_scaling-<time>)")
    p.add_argument("--gpus", help="simulated GPU counts (default 1,2,4,8,16,32,64; 1 is the real 1-rank run)")
    p.add_argument("--real-ranks", default="1,2", help="real horovodrun rank counts (default 1,2; 1 always runs)")
    p.add_argument(
        "--epochs", type=int, help=f"epochs of every run (default: the preset's; {QUICK_EPOCHS} with --quick)"
    )
    p.add_argument("--quick", action="store_true", help=f"smoke run: GPUs {QUICK_GPUS}, {QUICK_EPOCHS} epochs")
    p.add_argument("--data", type=Path, help="phantom dataset to use (default: made under OUT/data)")
    p.add_argument("--jobs", type=int, default=2, help="simulated runs at a time, one thread each (default 2)")
    p.add_argument("--predict", default="study_p100_edr", help="profiles for the report's predicted rows")
    a = p.parse_args(argv)
    a.gpus = a.gpus or (QUICK_GPUS if a.quick else "1,2,4,8,16,32,64")
    a.epochs = a.epochs or (QUICK_EPOCHS if a.quick else None)
    a.out = (a.out or Path("runs") / f"bench_scaling-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    a.data = a.data.resolve() if a.data else None
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    t_start = time.perf_counter()
    preset = yaml.safe_load(CONFIG.read_text())
    runs = plan([int(g) for g in a.gpus.split(",") if g], [int(r) for r in a.real_ranks.split(",") if r])
    (a.out / "logs").mkdir(parents=True, exist_ok=True)
    data = a.data
    if data is None:
        data = a.out / "data"
        if not (data / "dataset.json").is_file():
            _call([sys.executable, "-m", "jobs.make_phantoms", str(data), *PHANTOMS], a.out / "logs" / "phantoms.log")
    n_train = len(json.loads((data / "dataset.json").read_text())["training"])
    check_batches(runs, preset, n_train)
    epochs = a.epochs or preset["epochs"]
    print(
        f"bench_scaling: {len(runs)} runs ({', '.join(r.name for r in runs)}), {epochs} epochs of "
        f"{preset['samples_per_volume'] * n_train} patches each, recipe {CONFIG.relative_to(ROOT)}; output {a.out}",
        flush=True,
    )
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(
            f"  [{len(rows)}/{len(runs)}] {row['mode']} {row['gpus']} GPU(s): best Dice {row['best_dice']:.4f} "
            f"(epoch {row['best_epoch']}), {row['updates']} updates, {row['wall_s']:.0f} s",
            flush=True,
        )

    for run in (r for r in runs if r.mode == "real"):  # alone: their epoch times are measurements
        record(train(run, data, a.out, a.epochs))
    pool = ThreadPoolExecutor(max_workers=max(1, a.jobs))
    try:
        futures = [pool.submit(train, r, data, a.out, a.epochs) for r in runs if r.mode == "simulated"]
        for f in futures:
            record(f.result())
    finally:
        pool.shutdown(cancel_futures=True)  # after a failed run, do not start the queued ones
    base = add_relative(rows)
    report_dir, check = run_report(rows, a.out, a.predict)
    met, how = verdict(rows)
    total = time.perf_counter() - t_start
    table = format_table(rows)
    summary = {
        "recipe": str(CONFIG.relative_to(ROOT)),
        "epochs": epochs,
        "baseline_dice": base,
        "bar": BAR,
        "bar_met": met,
        "verdict": how,
        "total_s": total,
        "rows": rows,
        "model_check": check,
        "report": str(report_dir),
    }
    (a.out / "bench_scaling.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = f"```\n{table}\n```\n\nbar (simulated >= {BAR:.0%} of 1 GPU): {how}\n"
    (a.out / "bench_scaling.md").write_text(md + "".join(f"\n{line}\n" for line in check))
    print(f"\n{table}\n")
    print(f"bar: every simulated count keeps >= {BAR:.0%} of the 1-GPU best Dice ({base:.4f}): {how}")
    print("\n".join(f"model: {line}" for line in check))
    print(f"report: {report_dir}/scaling.md (+ scaling.csv, time_speedup.png, dice_relative.png)")
    print(f"total {total / 60:.1f} min; runs, logs and bench_scaling.json under {a.out}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"bench_scaling: error: {e}")
