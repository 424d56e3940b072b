"""U-Net training throughput (voxels/s) at 1 and 2 ranks, what a step is made of, and the machine's ceiling.

    python -m jobs.bench_unet                          # small phantoms in a temporary folder, 1 thread per rank
    python -m jobs.bench_unet --data data/phantoms_demo --epochs 3 --ranks 1,2,4

Each rank count runs the real trainer (`jobs.train_unet`, the demo config, launched as `jobs._launch` does) for a
few epochs; the figures come from the last epoch's `metrics.jsonl` record (the first epoch pays for start-up).

The control: the same model, loss and optimizer on random patches of the same size in plain PyTorch, run as 1
process and as N independent processes at once (no communication, the same work per process). N processes
sharing N cores and one memory bus do not reach N x one process; their aggregate over one process is the
ceiling for an N-rank speedup on this machine, and the bar is ours within 5% of it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hvdtrain.run import RunPaths
from jobs._launch import DEFAULT, NAMED, child_env, horovodrun_cmd, run_together

CONFIG = "jobs/configs/unet_demo.yaml"


def unet_step_seconds(cfg, steps: int, warmup: int, lr: float, foreground: float) -> float:
    """Seconds per plain-PyTorch training step (forward, Dice/BCE loss, backward, AdamW) of `cfg`'s U-Net on random
    patches of its patch size and per-GPU batch (`foreground` of the voxels labelled), after `warmup` untimed steps.
    """
    times = unet_step_times(cfg, steps, warmup, lr, foreground)
    return sum(times) / len(times)


def unet_step_times(cfg, steps: int, warmup: int, lr: float, foreground: float) -> list[float]:
    """Seconds of each of `steps` timed steps of `unet_step_seconds`'s loop (their spread is the straggler wait)."""
    from segmentation.engine import build_model, make_loss, model_kwargs

    model = build_model(model_kwargs(cfg))
    loss_fn = make_loss(cfg)  # one process: a global-batch Dice's sums are its own
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x = torch.randn(cfg.batch_size_per_gpu, 1, *cfg.patch_size)
    y = (torch.rand(cfg.batch_size_per_gpu, 1, *cfg.patch_size) > 1 - foreground).float()
    times = []
    for _ in range(steps + warmup):
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def plain_step(patch: tuple[int, int, int], batch: int, steps: int, features: int, depth: int) -> float:
    """Voxels/s of forward + Dice/BCE loss + backward + AdamW step in one process, one thread."""
    from segmentation.config import UNetConfig

    torch.set_num_threads(1)
    cfg = UNetConfig(features=features, depth=depth, patch_size=patch, batch_size_per_gpu=batch, global_dice=False)
    return batch * math.prod(patch) / unet_step_seconds(cfg, steps, warmup=2, lr=1e-3, foreground=0.05)


def plain_processes(n: int, steps: int, demo: dict) -> list[float]:
    """Voxels/s of each of `n` plain-PyTorch processes started together (the control: no communication)."""
    args = ["--steps", str(steps), "--features", str(demo["features"]), "--depth", str(demo["depth"])]
    args += ["--patch", ",".join(map(str, demo["patch_size"])), "--batch", str(demo["batch_size_per_gpu"])]
    cmd = [sys.executable, "-m", "jobs.bench_unet", "--plain-worker", *args]
    return run_together(cmd, n, "bench_unet: a plain-PyTorch control")


def run_trainer(ranks: int, data: Path, run_dir: Path, epochs: int, launch: str = "default") -> dict:
    cmd = [sys.executable, "-m", "jobs.train_unet", "--config", CONFIG, "--data", str(data), "--run-dir", str(run_dir)]
    cmd += ["--epochs", str(epochs), "--threads", "1", "--no-progress", "--eval-every", str(epochs)]
    if ranks > 1:
        cmd = horovodrun_cmd(ranks, cmd, NAMED[launch])
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(NAMED[launch]), timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"bench_unet: {' '.join(cmd)} failed\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    records = [json.loads(line) for line in RunPaths(run_dir).metrics.read_text().splitlines()]
    return [r for r in records if r["split"] == "train"][-1]


def _breakdown(rec: dict, steps: int, control_step_s: float) -> dict[str, float]:
    """Milliseconds per optimizer step: data wait, allreduce wait, model compute (from the control at the same
    process count), and the rest (the loop's Python, the per-step flags allreduce, logging)."""
    step = rec["time_s"] / steps
    data, comm = rec["data_s"] / steps, rec["comm_s"] / steps
    return {"step": step, "data": data, "allreduce": comm, "compute": control_step_s,
            "other": step - data - comm - control_step_s}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="phantom dataset (default: 8 small phantoms made in a temp folder)")
    p.add_argument("--ranks", default="1,2", help="rank counts (default 1,2)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is reported")
    p.add_argument("--launch", default="default", help="launch settings for N > 1 ranks, compared: " + ",".join(NAMED))
    p.add_argument("--control-steps", type=int, default=12, help="steps of each plain-PyTorch control process")
    p.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6, help=argparse.SUPPRESS)
    p.add_argument("--features", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--patch", default="48,48,24", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.plain_worker:
        patch = tuple(int(x) for x in a.patch.split(","))
        print(plain_step(patch, a.batch, a.steps, a.features, a.depth), flush=True)
        return []
    import yaml

    demo = yaml.safe_load(Path(CONFIG).read_text())
    patch, batch = tuple(demo["patch_size"]), demo["batch_size_per_gpu"]
    vox = math.prod(patch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if data is None:
            data = Path(tmp) / "phantoms"
            subprocess.run(
                [sys.executable, "-m", "jobs.make_phantoms", str(data), "--preset", "demo", "--n-train", "8",
                 "--n-val", "2", "--n-test", "0"],
                check=True, capture_output=True,
            )  # fmt: skip
        for n, launch in (
            (int(x), lab) for x in a.ranks.split(",") for lab in (a.launch.split(",") if x != "1" else ["-"])
        ):
            rec = run_trainer(n, data, Path(tmp) / f"run{n}{launch}", a.epochs, "default" if launch == "-" else launch)
            per_rank = plain_processes(n, a.control_steps, demo)  # right after: the same machine state
            steps = rec["samples"] / (batch * n)
            control_step_s = batch * vox / (sum(per_rank) / n)
            rows.append(
                {
                    "ranks": n,
                    "launch": launch,
                    "voxels_per_s": rec["samples_per_s"] * vox,
                    "control_voxels_per_s": sum(per_rank),
                    "data_share": rec["data_s"] / rec["time_s"],
                    "comm_share": rec["comm_s"] / rec["time_s"],
                    "ms": {k: v * 1e3 for k, v in _breakdown(rec, steps, control_step_s).items()},
                }
            )
    print_rows(rows, demo, patch, batch)
    return rows


def print_rows(rows: list[dict], demo: dict, patch: tuple, batch: int) -> None:
    print(f"U-Net {demo['features']} features, depth {demo['depth']}, patch {patch}, batch {batch}/rank, 1 thread/rank")
    print(f"launch: {DEFAULT.describe()}")
    head = ["ranks", "launch", "voxels/s", "speedup", "control vox/s", "ceiling", "ours/ceil"]
    print(" | ".join(f"{h:>9}" for h in head) + " | per step ms: total = data + allreduce + compute + other")
    base, cbase = rows[0]["voxels_per_s"], rows[0]["control_voxels_per_s"]
    for r in rows:
        speedup, ceiling = r["voxels_per_s"] / base, r["control_voxels_per_s"] / cbase
        ms = r["ms"]
        cells = [str(r["ranks"]), r["launch"], f"{r['voxels_per_s']:,.0f}", f"{speedup:.2f}x"]
        cells += [f"{r['control_voxels_per_s']:,.0f}", f"{ceiling:.2f}x", f"{speedup / ceiling:.0%}"]
        parts = f"{ms['step']:.0f} = {ms['data']:.1f} + {ms['allreduce']:.1f} + {ms['compute']:.0f} + {ms['other']:.1f}"
        print(" | ".join(f"{c:>9}" for c in cells) + " | " + parts)
    print(
        f"plain PyTorch, 1 process: {cbase:,.0f} voxels/s (hvdtrain at 1 rank = {base / cbase:.2f} of it). "
        "ceiling = N independent plain processes / 1; other = loop Python + per-step flags allreduce + logging"
    )
    for r in rows[1:]:
        speedup, ceiling = r["voxels_per_s"] / base, r["control_voxels_per_s"] / cbase
        verdict = "met" if speedup >= 1.8 or speedup / ceiling >= 0.95 else "NOT met"
        print(f"{r['ranks']} ranks ({r['launch']}): speedup {speedup:.2f}x, ceiling {ceiling:.2f}x "
              f"(bar: >= 1.8x, or within 5% of the ceiling: {verdict})")  # fmt: skip


if __name__ == "__main__":
    main()
