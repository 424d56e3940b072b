"""Train the 3D U-Net lung-nodule segmenter under Horovod.

    python -m jobs.make_phantoms data/phantoms_demo --preset demo
    horovodrun -np 2 python -m jobs.train_unet --config jobs/configs/unet_demo.yaml --run-dir runs/unet_demo
    sbatch slurm/unet_64gpu.sh                       # the same job on 64 GPUs

The run folder gets config.json, metrics.jsonl, tb/, checkpoints/{last,best}.pt, summary.json and
per_case_dice.csv (the best checkpoint's Dice on every validation case). `--resume` continues from last.pt.
"""

from __future__ import annotations

from pathlib import Path

from hvdtrain import dist, evaluate_best, fit, parse_config
from segmentation.config import UNetConfig
from segmentation.engine import build_run, prepare_data
from segmentation.metrics import write_per_case_csv


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(UNetConfig, argv)
    dist.init(cfg.threads or None, cfg.stall_timeout)
    train_cases, val_cases = prepare_data(cfg, progress=dist.is_main() and cfg.progress)
    dist.print0(f"{len(train_cases)} training / {len(val_cases)} validation cases from {cfg.data}")
    run = build_run(cfg, train_cases, val_cases)
    summary = fit(run, cfg)
    if summary["preempted"]:
        return summary
    result, metric, ckpt = evaluate_best(run, cfg)  # the best checkpoint's Dice on every validation case
    rows = metric.gather_rows()  # hvd: collective, every rank
    if dist.is_main():
        path = write_per_case_csv(rows, Path(cfg.run_dir) / "per_case_dice.csv")
        which = f"best (epoch {ckpt['best_epoch']})" if ckpt is not None else "final"
        print(
            f"{which} checkpoint: mean Dice {result['dice']:.4f} over {result['scored_cases']} case(s), "
            f"global Dice {result['dice_global']:.4f}; per case: {path}",
            flush=True,
        )
    return {**summary, "best_checkpoint": result}


if __name__ == "__main__":
    main()
