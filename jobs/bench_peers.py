"""Time to Dice against MONAI: our U-Net, MONAI's `UNet` and `BasicUNet` on the same split, data and loop.

    python -m jobs.bench_peers --config jobs/configs/unet_lidc.yaml --minutes 10 --out runs/peers
    python -m jobs.bench_peers --models ours --minutes 1 --data data/phantoms_demo --cache-dir /tmp/c   # no MONAI

Every model trains in this one process with the same `--threads`, on the same preprocessed cases (the preset's
split, spacing, window), the same patches and augmentation (our `PatchDataset`, same seed), the same loss (the
preset's Dice + BCE; our network's deep supervision when the preset has it, since it is part of our recipe and
MONAI's networks have none), the same optimizer (AdamW at the preset's LR, 2% warmup then a cosine over the time
budget, so each model ends its schedule at `--minutes`), and is validated at the same training times on the same
cases by the same sliding window, on the same resampled grid. Only the network (with its heads) differs. Dice is
reported raw and with the preset's post-processing. Validation time is not counted as training time.

MONAI is a benchmark-only extra: when it does not import, this job installs `monai` (pinned, no dependencies: it
needs only torch and numpy) into the running interpreter first (`--no-install` stops instead).

Writes `OUT/peers.csv` (model, train_s, epoch, dice, dice_post), `OUT/peers.md` and `OUT/peers.png`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hvdtrain import data, dist
from hvdtrain.config import parse_config
from segmentation.config import UNetConfig
from segmentation.engine import build_model, make_loss, model_kwargs, patch_dataset, prepare_data
from segmentation.inference import predict_probabilities
from segmentation.metrics import DiceMetric
from segmentation.postprocess import postprocess_mask
from segmentation.sampling import VolumeDataset

MONAI_PIN = "monai==1.6.1"
MODELS = ("ours", "monai_unet", "monai_basicunet")


def ensure_monai(install: bool) -> None:
    if importlib.util.find_spec("monai") is not None:
        return
    if not install:
        raise SystemExit("bench_peers: MONAI is not installed; pip install monai, or drop --no-install")
    print(f"bench_peers: installing {MONAI_PIN} (benchmark-only)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", MONAI_PIN], check=True)


def build(name: str, cfg: UNetConfig) -> nn.Module:
    """The network called `name`; MONAI's as the issue's comparison set them up (channels 8-64, residual units)."""
    if name == "ours":  # the preset's network, deep supervision included when it sets it (our recipe)
        return build_model(model_kwargs(cfg))
    from monai.networks.nets import BasicUNet, UNet

    if name == "monai_unet":
        return UNet(3, 1, 1, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=2, norm="instance")
    if name == "monai_basicunet":
        return BasicUNet(3, 1, 1, features=(8, 8, 16, 32, 64, 8))
    raise SystemExit(f"bench_peers: unknown model {name!r}; choose from {', '.join(MODELS)}")


def lr_at(cfg: UNetConfig, frac: float) -> float:
    """2% linear warmup, then a cosine to 0 over the time budget (`frac` = training time used / budget)."""
    warm = 0.02
    if frac < warm:
        return cfg.lr * max(frac / warm, 0.01)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm))))


@torch.no_grad()
def validate(model: nn.Module, cfg: UNetConfig, val_cases) -> tuple[float, float]:
    """(mean Dice raw, mean Dice post-processed) over the validation cases on the resampled grid."""
    model.eval()
    raw, post = DiceMetric(), DiceMetric()
    spacing = tuple(cfg.target_spacing) if all(t > 0 for t in cfg.target_spacing) else None
    for image, label, case_id in VolumeDataset(val_cases):
        prob = predict_probabilities(model, image, cfg.patch_size, cfg.sw_overlap, cfg.sw_batch_size)
        target = label[0].numpy()
        raw.update(case_id, prob > cfg.threshold, target)
        post.update(case_id, postprocess_mask(prob > cfg.threshold, cfg.postprocess, spacing), target)
    model.train()
    return raw.compute()["dice"], post.compute()["dice"]


def train_for(name: str, cfg: UNetConfig, train_cases, val_cases, seconds: float, n_evals: int) -> list[dict]:
    """Train `name` for `seconds` of training time, validating `n_evals` times at even shares of it."""
    torch.manual_seed(cfg.seed)
    model = build(name, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = make_loss(replace(cfg, global_dice=False))
    loader = data.train_loader(patch_dataset(cfg, train_cases), cfg.batch_size_per_gpu, cfg.seed)
    rows, spent, epoch, next_eval = [], 0.0, 0, seconds / n_evals
    params = sum(p.numel() for p in model.parameters())
    heads = " (deep supervision)" if getattr(model, "deep_supervision", False) else ""
    print(f"{name}: {params / 1e6:.3f} M parameters{heads}, {seconds / 60:.1f} min of training", flush=True)
    model.train()
    while spent < seconds:
        data.set_epoch(loader, epoch)
        for image, label in loader:
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, spent / seconds)
            loss = loss_fn(model(image), label)
            opt.zero_grad()
            loss.backward()
            opt.step()
            spent += time.perf_counter() - t0
            if spent >= next_eval or spent >= seconds:
                dice, dice_post = validate(model, cfg, val_cases)
                rows.append(
                    {"model": name, "train_s": round(spent, 1), "epoch": epoch, "dice": dice, "dice_post": dice_post}
                )
                print(
                    f"  {name} {spent:7.1f} s (epoch {epoch}): Dice {dice:.4f}, post-processed {dice_post:.4f}",
                    flush=True,
                )
                next_eval += seconds / n_evals
            if spent >= seconds:
                break
        epoch += 1
    return rows


def write_outputs(rows: list[dict], out: Path, cfg: UNetConfig) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "peers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        f"Validation Dice against training time (one process, {torch.get_num_threads()} threads; "
        f"post-processing: {cfg.postprocess})",
        "",
        "| model | " + " | ".join(f"{r['train_s'] / 60:.1f} min" for r in rows if r["model"] == models[0]) + " |",
        "|---|" + "---|" * sum(r["model"] == models[0] for r in rows),
    ]
    for m in models:
        cells = [f"{r['dice']:.3f} / {r['dice_post']:.3f}" for r in rows if r["model"] == m]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: raw Dice / post-processed Dice (mean over validation cases, resampled grid)."]
    table = "\n".join(lines)
    (out / "peers.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        pts = [(r["train_s"] / 60, r["dice_post"]) for r in rows if r["model"] == m]
        ax.plot(*zip(*pts), marker="o", label=m)
    ax.set(xlabel="training time (min)", ylabel="validation Dice (post-processed)", title="Time to Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "peers.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="jobs/configs/unet_lidc.yaml", help="U-Net preset: data, preprocessing, loss")
    p.add_argument("--data", help="dataset folder (default: the preset's)")
    p.add_argument("--cache-dir", help="preprocessed cache (default: the preset's)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--minutes", type=float, default=10.0, help="training time per model")
    p.add_argument("--evals", type=int, default=5, help="validations per model, at even shares of the time")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the same for every model)")
    p.add_argument("--out", default="runs/bench_peers", help="output folder")
    p.add_argument("--no-install", action="store_true", help="do not pip-install MONAI when it is missing")
    p.add_argument(
        "--preset-flags",
        default="",
        help='flags applied over the preset, e.g. "--top-features 4 --residual" (a variant of ours to compare)',
    )
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m.startswith("monai") for m in names):
        ensure_monai(not args.no_install)
    overrides = [x for k, v in (("--data", args.data), ("--cache-dir", args.cache_dir)) if v for x in (k, v)]
    cfg = parse_config(UNetConfig, ["--config", args.config, *overrides, *shlex.split(args.preset_flags)])
    dist.init(args.threads)
    torch.set_num_threads(args.threads)
    train_cases, val_cases = prepare_data(cfg, progress=False)
    print(f"bench_peers: {len(train_cases)} training / {len(val_cases)} validation cases from {cfg.data}", flush=True)
    rows = []
    for name in names:
        rows += train_for(name, cfg, train_cases, val_cases, args.minutes * 60, args.evals)
    print(write_outputs(rows, Path(args.out), cfg))
    best = {m: max(r["dice_post"] for r in rows if r["model"] == m) for m in names}
    print("best post-processed Dice: " + ", ".join(f"{m} {v:.4f}" for m, v in best.items()))
    print(f"wrote {Path(args.out) / 'peers.csv'}, peers.md, peers.png")
    return rows


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
