"""Classifier training throughput (images/s) per model at 1 and 2 ranks, and the data-loading share of the step.

    python -m jobs.bench_classifier                                   # synthetic BUSI-like set, 1 thread per rank
    python -m jobs.bench_classifier --models resnet18,mobilenet_v2 --image-size 224 --ranks 1,2,4

Each point is the real trainer (`jobs.train_classifier`, fold 0) for a few epochs; figures are from the last
epoch's `metrics.jsonl` record. The study this suite replaces found 4 GPUs slower than 2 on this task: the data
share and the speedup columns show where the time goes (decode + resize of each PNG, per rank).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from hvdtrain.run import RunPaths
from jobs._launch import child_env, horovodrun_cmd

MODELS = "small_cnn,mobilenet_v2,resnet18,resnet34,resnet50"


def run(model: str, ranks: int, data: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "jobs.train_classifier", "--data", str(data), "--run-dir", str(run_dir)]
    cmd += ["--model", model, "--fold", "0", "--folds", "5", "--epochs", str(args.epochs), "--threads", "1"]
    cmd += ["--image-size", str(args.image_size), "--batch-size-per-gpu", str(args.batch), "--no-progress"]
    cmd += ["--eval-every", str(args.epochs), "--num-workers", str(args.workers), "--dedup-threshold", "-1"]
    if ranks > 1:
        cmd = horovodrun_cmd(ranks, cmd)
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"bench_classifier: {' '.join(cmd)} failed\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    records = [json.loads(line) for line in RunPaths(run_dir / "fold_0").metrics.read_text().splitlines()]
    return [r for r in records if r["split"] == "train"][-1]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="dataset (default: a synthetic set of 60 images in a temp folder)")
    p.add_argument("--models", default=MODELS, help=f"comma-separated (default {MODELS})")
    p.add_argument("--ranks", default="1,2", help="rank counts (default 1,2)")
    p.add_argument("--image-size", type=int, default=224, help="crop side (default 224, the study's)")
    p.add_argument("--batch", type=int, default=8, help="images per rank per step (default 8)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is reported")
    p.add_argument("--workers", type=int, default=0, help="data-loader workers per rank (default 0)")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if data is None:
            data = Path(tmp) / "us"
            subprocess.run(
                [sys.executable, "-m", "jobs.make_ultrasound", str(data), "--n-per-class", "20", "--size", "256"],
                check=True, capture_output=True,
            )  # fmt: skip
        for model in a.models.split(","):
            base = None
            for n in (int(x) for x in a.ranks.split(",")):
                rec = run(model, n, data, Path(tmp) / f"{model}_{n}", a)
                base = base or rec["samples_per_s"]
                rows.append({"model": model, "ranks": n, "images_per_s": rec["samples_per_s"],
                             "speedup": rec["samples_per_s"] / base, "data_share": rec["data_s"] / rec["time_s"],
                             "comm_share": rec["comm_s"] / rec["time_s"]})  # fmt: skip
                r = rows[-1]
                print(
                    f"{model:>13} x{n}: {r['images_per_s']:7.2f} images/s, speedup {r['speedup']:.2f}x, "
                    f"data {r['data_share']:.1%}, allreduce wait {r['comm_share']:.1%}",
                    flush=True,
                )
    print(f"\nimage {a.image_size}, batch {a.batch}/rank, 1 thread/rank, {a.workers} loader workers")
    print(f"{'model':>13} | {'ranks':>5} | {'images/s':>8} | {'speedup':>7} | {'data':>6} | {'allreduce':>9}")
    for r in rows:
        print(
            f"{r['model']:>13} | {r['ranks']:>5} | {r['images_per_s']:>8.2f} | {r['speedup']:>6.2f}x | "
            f"{r['data_share']:>6.1%} | {r['comm_share']:>9.1%}"
        )
    return rows


if __name__ == "__main__":
    main()
