"""How much ranks on one node slow each other and how much their steps vary: contention and straggler spread.

    python -m jobs.bench_contention                                  # the jobs.bench_scaling recipe, 1 vs 2 processes
    python -m jobs.bench_contention --config jobs/configs/unet_demo.yaml --procs 2 --repeats 5

The probe behind `contention` and `step_cv` in `scaling.perfmodel`'s CPU profile. It times the recipe's training
step (its U-Net, Dice + BCE loss and AdamW on random patches of its patch size and per-GPU batch, the preset's
threads per process, no communication) in one process alone, then in `--procs` independent processes started
together, `--repeats` times alternately. The factor is the median of the processes' mean step times among `--procs`
over the median of the mean step times alone: each rank's compute on a node with that many busy ranks is the 1-rank
compute times the factor (on this 2-core host the processes share the memory bus and the L3 cache, so it can be
above 1 even with a core each).

The spread (`step_cv`) is the coefficient of variation of one step's time in a process among others (the median
over the processes): synchronous ranks wait for the slowest at every step, so a spread of cv makes a step of one
micro-batch on 2 ranks last 1 + 0.56 cv times the mean (`scaling.perfmodel.straggler_factor`).

It never runs the trainer or Horovod: the multi-rank runs that the calibrated model predicts play no part in it,
so the out-of-sample check of `jobs.scaling_report` stays out of sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from jobs._launch import run_together
from jobs.bench_unet import unet_step_times
from scaling.perfmodel import straggler_factor

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "unet_bench_scaling.yaml"


def step_times(config: str | Path, steps: int, threads: int | None = None) -> list[float]:
    """Seconds of each training step of the preset's U-Net in this process (after 3 untimed steps)."""
    from hvdtrain import parse_config
    from segmentation.config import UNetConfig

    cfg = parse_config(UNetConfig, ["--config", str(config)])
    torch.set_num_threads(threads or cfg.threads or 1)
    torch.manual_seed(0)
    return unet_step_times(cfg, steps, warmup=3, lr=cfg.lr, foreground=0.1)


def concurrent_step_times(n: int, config: str | Path, steps: int, threads: int | None) -> list[list[float]]:
    """Seconds of each step of each of `n` worker processes started together."""
    cmd = [sys.executable, "-m", "jobs.bench_contention", "--worker", "--config", str(config), "--steps", str(steps)]
    cmd += ["--threads", str(threads)] if threads else []
    return run_together(cmd, n, "bench_contention", parse=json.loads)


def contention_factor(alone: list[float], together: list[list[float]]) -> float:
    """Median mean step time of a process among others over the median alone (> 1 when they slow each other).

    `alone`: one mean step time per round; `together`: per round, one per process.
    """
    if not alone or not together or not all(together):
        raise ValueError("need at least one step time alone and one of the processes run together")
    return statistics.median(t for run in together for t in run) / statistics.median(alone)


def step_cvs(steps: list[list[float]]) -> list[float]:
    """Each process's coefficient of variation (population sd / mean) of its step times."""
    if not steps or any(len(s) < 2 for s in steps):
        raise ValueError("need at least two step times per process")
    return [statistics.pstdev(s) / statistics.fmean(s) for s in steps]


def spread(steps: list[list[float]]) -> float:
    """Median over the processes of the coefficient of variation of their step times (`step_cvs`)."""
    return statistics.median(step_cvs(steps))


def _rel(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.bench_contention", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG), help="U-Net preset whose step is timed (default: bench_scaling's)")
    p.add_argument("--procs", type=int, default=2, help="processes run together (default 2: one per core here)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per process")
    p.add_argument("--repeats", type=int, default=3, help="alone / together rounds, alternated")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the preset's)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(step_times(a.config, a.steps, a.threads)), flush=True)
        return {}
    if a.procs < 2 or a.repeats < 1 or a.steps < 2:
        p.error("need --procs >= 2, --repeats >= 1 and --steps >= 2 (the spread needs two step times)")
    t0 = time.time()
    alone, together, steps_together = [], [], []
    for _ in range(a.repeats):  # alternated, so a drift of the machine's speed hits both sides alike
        alone += [statistics.fmean(s) for s in concurrent_step_times(1, a.config, a.steps, a.threads)]
        runs = concurrent_step_times(a.procs, a.config, a.steps, a.threads)
        together.append([statistics.fmean(s) for s in runs])
        steps_together += runs
    factor = contention_factor(alone, together)
    cvs = step_cvs(steps_together)
    cv = statistics.median(cvs)  # spread(steps_together), from the per-process figures kept below
    out = {
        "config": _rel(a.config),
        "procs": a.procs,
        "steps": a.steps,
        "alone_step_s": alone,
        "together_step_s": together,
        "contention": factor,
        "step_cv": cv,
        "step_cv_per_process": cvs,
        "wall_s": time.time() - t0,
    }
    print(f"step of {_rel(a.config)}, {a.steps} steps per process, {a.repeats} rounds")
    print("alone:    " + ", ".join(f"{t * 1e3:.2f}" for t in alone) + " ms/step")
    for run in together:
        print(f"{a.procs} at once: " + ", ".join(f"{t * 1e3:.2f}" for t in run) + " ms/step")
    print(f"contention factor at {a.procs} processes per node: {factor:.3f} (median step among {a.procs} / alone); "
          f"{out['wall_s']:.0f} s")  # fmt: skip
    print(f"step time spread among {a.procs} processes: cv {cv:.3f} (median over processes); the slowest of 2 "
          f"synchronous ranks: x{straggler_factor(2, 1, cv):.3f} per step of one micro-batch")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
