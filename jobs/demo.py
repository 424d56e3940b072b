"""A small Horovod run on generated data: `horovodrun -np 2 python -m jobs.demo --run-dir runs/demo`.

Prints the validation loss going down; writes the run folder (config.json, metrics.jsonl, checkpoints/, tb/).
"""

from __future__ import annotations

from dataclasses import dataclass

from hvdtrain import Run, TrainConfig, arg, batching, data, dist, fit, parse_config, seeding, to_dict
from hvdtrain.testing import ToyMetric, ToyNet, eval_fn, make_blobs, step_fn


@dataclass(frozen=True)
class DemoConfig(TrainConfig):
    """Toy blob-quadrant classifier on generated data."""

    run_dir: str = arg("runs/demo", "run folder")
    epochs: int = arg(5, "training epochs")
    batch_size_per_gpu: int = arg(16, "samples per rank per micro-batch")
    lr: float = arg(0.02, "base learning rate for one GPU")
    optimizer: str = arg("sgd", "optimizer", ("sgd", "adamw", "lamb", "lars"))
    warmup_epochs: float = arg(0.5, "warmup epochs")
    n_train: int = arg(1024, "generated training images")
    n_val: int = arg(256, "generated validation images")
    width: int = arg(16, "convolution channels")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(DemoConfig, argv)
    cfg = batching.resolve(cfg, dist.init(cfg.threads or None, cfg.stall_timeout).size)
    seeding.seed_init(cfg.seed)
    train = data.train_loader(
        make_blobs(cfg.n_train, seed=cfg.seed),
        cfg.batch_size_per_gpu,
        cfg.seed,
        micro_per_step=cfg.micro_per_step,
        simulate_gpus=cfg.simulate_gpus,
    )
    val = data.eval_loader(make_blobs(cfg.n_val, seed=cfg.seed + 1), 64)
    run = Run(ToyNet(cfg.width), train, val, step_fn, eval_fn, ToyMetric, to_dict(cfg), monitor="loss", mode="min")
    summary = fit(run, cfg)
    if not summary["preempted"]:
        dist.print0(
            f"done: best val loss {summary['best_metric']:.4f} at epoch {summary['best_epoch']}, "
            f"final accuracy {summary['final']['accuracy']:.3f}; run folder {cfg.run_dir}"
        )
    return summary


if __name__ == "__main__":
    main()
