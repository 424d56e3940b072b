"""Run by tests/test_simulation_exact.py under horovodrun (real ranks) and as one plain process (simulated GPUs).

python tests/sim_worker.py unet DATA OUT [--simulate-gpus N] [--epochs E] [--sync-bn] [--fuse]  (Decathlon phantoms)
python tests/sim_worker.py classifier DATA OUT [--simulate-gpus N] [--epochs E] [--sync-bn] [--fuse]  (ultrasound)

Each trains the task's real pieces through `hvdtrain.fit` and writes OUT/<what>[_syncbn][_fused]_sim<N>_rank<r>.pt: the
summary and the final state dict (parameters and running statistics). --sync-bn synchronises BatchNorm (the U-Net
then uses BatchNorm instead of instance norm); --fuse forwards the simulated GPUs as one batch (--fuse-simulated).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvdtrain import dist


def unet(data: Path, out: Path, simulate_gpus: int, epochs: int, sync_bn: bool = False, fuse: bool = False) -> dict:
    """Global-batch Dice + BCE, deep supervision, dropout, augmentation, AdamW with warmup and the sqrt LR rule.

    4 training volumes x 10 patches: 10 steps of global batch 4 per epoch (5 of 8 on 4 GPUs).
    """
    from hvdtrain import fit
    from segmentation.config import UNetConfig
    from segmentation.engine import build_run, prepare_data

    cfg = UNetConfig(
        data=str(data),
        cache_dir=str(out / f"cache_unet_sim{simulate_gpus}"),
        run_dir=str(out / f"unet_sim{simulate_gpus}"),
        norm="batch" if sync_bn else "instance",
        sync_bn=sync_bn,
        fuse_simulated=fuse,
        epochs=epochs,
        batch_size_per_gpu=2,
        simulate_gpus=simulate_gpus,
        patch_size=(16, 16, 8),
        samples_per_volume=10,
        features=4,
        depth=2,
        deep_supervision=True,
        dropout=0.2,
        augment=True,
        batch_dice=True,
        global_dice=True,
        ce_weight=1.0,
        optimizer="adamw",
        lr=0.002,
        lr_rule="sqrt",
        warmup_epochs=1.0,
        schedule="cosine",
        eval_every=2,
        progress=False,
        threads=1,
        amp="off",
    )
    train_cases, val_cases = prepare_data(cfg, progress=False)
    run = build_run(cfg, train_cases, val_cases)
    return {"summary": fit(run, cfg), "final": run.model.state_dict()}


def classifier(
    data: Path, out: Path, simulate_gpus: int, epochs: int, sync_bn: bool = False, fuse: bool = False
) -> dict:
    """SmallCNN (BatchNorm) with dropout, the cached augmentation pipeline, mixup, SGD with warmup and the linear rule.

    36 images, 32 training: 8 steps of global batch 4 per epoch (4 of 8 on 4 GPUs).
    """
    from classification.config import ClassifierConfig
    from classification.data import load_index
    from classification.engine import build_run
    from classification.splits import Fold
    from hvdtrain import fit

    cfg = ClassifierConfig(
        data=str(data),
        run_dir=str(out / f"classifier_sim{simulate_gpus}"),
        sync_bn=sync_bn,
        fuse_simulated=fuse,
        cache_dir=str(out / f"cache_cls_sim{simulate_gpus}"),
        epochs=epochs,
        batch_size_per_gpu=2,
        simulate_gpus=simulate_gpus,
        model="small_cnn",
        dropout=0.3,
        image_size=32,
        resize_size=36,
        augment=True,
        mixup=0.4,
        optimizer="sgd",
        momentum=0.9,
        lr=0.02,
        lr_rule="linear",
        warmup_epochs=1.0,
        eval_every=1,
        progress=False,
        threads=1,
        amp="off",
    )
    index = load_index(cfg.data)
    n = len(index.samples)
    fold = Fold(train=[i for i in range(n) if i % 9], val=[i for i in range(n) if i % 9 == 0])
    run = build_run(cfg, index, fold)
    return {"summary": fit(run, cfg), "final": run.model.state_dict()}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["unet", "classifier"])
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--simulate-gpus", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--fuse", action="store_true", help="--fuse-simulated")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    d = dist.init(threads=1)
    result = {"unet": unet, "classifier": classifier}[a.what](
        a.data, a.out, a.simulate_gpus, a.epochs, a.sync_bn, a.fuse
    )
    tag = ("_syncbn" if a.sync_bn else "") + ("_fused" if a.fuse else "")
    torch.save(result, a.out / f"{a.what}{tag}_sim{a.simulate_gpus}_rank{d.rank}.pt")
