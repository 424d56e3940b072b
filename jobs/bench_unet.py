"""U-Net training throughput (voxels/s) at 1 and 2 ranks, the data-wait share, and plain PyTorch beside it.

    python -m jobs.bench_unet                          # small phantoms in a temporary folder, 1 thread per rank
    python -m jobs.bench_unet --data data/phantoms_demo --epochs 3 --ranks 1,2,4

Each rank count runs the real trainer (`jobs.train_unet`, the demo config) for a few epochs; the figures come
from the last epoch's `metrics.jsonl` record (the first epoch pays for start-up). The plain-PyTorch line times the
same model, loss and optimizer on random patches of the same size in one process: the ceiling for one rank.
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

from jobs._launch import child_env

CONFIG = "jobs/configs/unet_demo.yaml"


def plain_step(patch: tuple[int, int, int], batch: int, steps: int, features: int, depth: int) -> float:
    """Voxels/s of forward + Dice/BCE loss + backward + AdamW step in one process, one thread."""
    from segmentation.config import UNetConfig
    from segmentation.engine import build_model, make_loss, model_kwargs

    torch.set_num_threads(1)
    cfg = UNetConfig(features=features, depth=depth, patch_size=patch, global_dice=False)
    model = build_model(model_kwargs(cfg))
    loss_fn = make_loss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, *patch)
    y = (torch.rand(batch, 1, *patch) > 0.95).float()
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch * math.prod(patch) / (time.perf_counter() - t0)


def run_trainer(ranks: int, data: Path, run_dir: Path, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "jobs.train_unet", "--config", CONFIG, "--data", str(data), "--run-dir", str(run_dir)]
    cmd += ["--epochs", str(epochs), "--threads", "1", "--no-progress", "--eval-every", str(epochs)]
    if ranks > 1:
        cmd = ["horovodrun", "-np", str(ranks), "--gloo", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"bench_unet: {' '.join(cmd)} failed\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"][-1]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="phantom dataset (default: 8 small phantoms made in a temp folder)")
    p.add_argument("--ranks", default="1,2", help="rank counts (default 1,2)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is reported")
    a = p.parse_args(argv)
    import yaml

    demo = yaml.safe_load(Path(CONFIG).read_text())
    patch, batch = tuple(demo["patch_size"]), demo["batch_size_per_gpu"]
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
        for n in (int(x) for x in a.ranks.split(",")):
            rec = run_trainer(n, data, Path(tmp) / f"run{n}", a.epochs)
            vox = rec["samples_per_s"] * math.prod(patch)
            share = {k: rec[f"{k}_s"] / rec["time_s"] for k in ("data", "comm")}
            rows.append({"ranks": n, "voxels_per_s": vox, "samples_per_s": rec["samples_per_s"],
                         "data_share": share["data"], "comm_share": share["comm"]})  # fmt: skip
    plain = plain_step(patch, batch, 6, demo["features"], demo["depth"])
    print(f"U-Net {demo['features']} features, depth {demo['depth']}, patch {patch}, batch {batch}/rank, 1 thread/rank")
    print(f"{'ranks':>5} | {'voxels/s':>12} | {'patches/s':>9} | {'speedup':>7} | {'data wait':>9} | {'allreduce':>9}")
    for r in rows:
        print(
            f"{r['ranks']:>5} | {r['voxels_per_s']:>12,.0f} | {r['samples_per_s']:>9.2f} | "
            f"{r['voxels_per_s'] / rows[0]['voxels_per_s']:>6.2f}x | {r['data_share']:>8.1%} | {r['comm_share']:>8.1%}"
        )
    print(
        f"plain PyTorch step, 1 process: {plain:,.0f} voxels/s "
        f"(hvdtrain at 1 rank = {rows[0]['voxels_per_s'] / plain:.2f} of it)"
    )
    return rows


if __name__ == "__main__":
    main()
