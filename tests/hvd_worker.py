"""Run under a launcher by tests/test_hvd_multirank.py (also as one plain process): checks that need real ranks.

python tests/hvd_worker.py collectives OUT
python tests/hvd_worker.py train OUT --batch B [--simulate-gpus N] [--accum K] [--dropout P]
python tests/hvd_worker.py streams OUT [--simulate-gpus N]   (OUT/same.png: the image every sample shows)
python tests/hvd_worker.py syncbn OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classification.data import ImageDataset, Sample
from classification.transforms import train_transform
from hvdtrain import Run, TrainConfig, data, dist, fit, seeding
from hvdtrain.metrics import SumMetric
from hvdtrain.syncbn import sync_batch_norm
from hvdtrain.testing import ToyMetric, ToyNet, eval_fn, make_blobs, step_fn


def collectives(out: Path) -> None:
    d = dist.init(threads=1)
    r = {"rank": d.rank, "size": d.size, "local_rank": d.local_rank, "local_size": d.local_size}
    r["sum_int"] = dist.allreduce(d.rank + 1)
    r["mean_float"] = dist.allreduce(float(d.rank), op="mean")
    r["sum_tensor"] = dist.allreduce(torch.tensor([1.0, d.rank])).tolist()
    r["broadcast"] = dist.broadcast_object({"from": d.rank})
    r["gather"] = dist.allgather_object(d.rank * 10)
    # Evaluation visits each sample exactly once, also when the count does not divide by the ranks.
    r["eval"] = {}
    for n in (5, 1, 4, 7):
        loader = data.eval_loader(TensorDataset(torch.arange(n)), batch_size=2)
        seen = [int(i) for (batch,) in loader for i in batch]
        metric = SumMetric("count", "index_sum")
        metric.add(count=len(seen), index_sum=sum(seen))
        r["eval"][n] = {"all": sorted(i for s in dist.allgather_object(seen) for i in s), **metric.compute()}
    (out / f"collectives_{d.rank}.json").write_text(json.dumps(r))


def train(out: Path, batch: int, simulate_gpus: int, accum: int, dropout: float = 0.0) -> None:
    d = dist.init(threads=1)
    seeding.seed_init(0)
    cfg = TrainConfig(
        run_dir=str(out / "run"),
        epochs=2,
        batch_size_per_gpu=batch,
        lr=0.05,
        lr_rule="none",
        warmup_epochs=0,
        schedule="cosine",
        optimizer="sgd",
        simulate_gpus=simulate_gpus,
        accum=accum,
        progress=False,
    )
    micro = accum * simulate_gpus
    loader = data.train_loader(make_blobs(96, seed=3), batch, seed=7, micro_per_step=micro, simulate_gpus=simulate_gpus)
    val = data.eval_loader(make_blobs(10, seed=4), 4)
    model = ToyNet(8, dropout=dropout)  # masks match between real and simulated GPUs, not other batch layouts
    fit(Run(model, loader, val, step_fn, eval_fn, ToyMetric, monitor="loss", mode="min"), cfg)
    torch.save(model.state_dict(), out / f"weights_rank{d.rank}.pt")


def streams(out: Path, simulate_gpus: int) -> None:
    """One epoch on 16 copies of one image, recording each micro-batch's augmented images and dropout mask."""
    d = dist.init(threads=1)
    samples = [Sample(out / "same.png", i % 2) for i in range(16)]
    loader = data.train_loader(
        ImageDataset(samples, train_transform(16), seed=7), 2, seed=7, micro_per_step=simulate_gpus,
        simulate_gpus=simulate_gpus,
    )  # fmt: skip
    seeding.seed_init(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 16 * 16, 2))
    init = {k: v.clone() for k, v in model.state_dict().items()}  # before fit broadcasts rank 0's weights
    rec: dict[str, list] = {"x": [], "mask": []}
    model[1].register_forward_hook(lambda m, i, o: rec["mask"].append(o == 0))

    def step(model, batch, device):
        rec["x"].append(batch[0])
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1]), len(batch[1])

    cfg = TrainConfig(run_dir=str(out / f"run{simulate_gpus}"), epochs=1, batch_size_per_gpu=2, lr=0.1,
                      lr_rule="none", warmup_epochs=0, optimizer="sgd", simulate_gpus=simulate_gpus, progress=False,
                      eval_every=2)  # fmt: skip
    fit(Run(model, loader, data.eval_loader(make_blobs(2), 2), step, lambda *a: None, ToyMetric, monitor="count"), cfg)
    torch.save({**rec, "init": init, "final": model.state_dict()}, out / f"streams_sim{simulate_gpus}_rank{d.rank}.pt")


def syncbn(out: Path) -> None:
    d = dist.init(threads=1)
    torch.save(syncbn_case(d.rank, d.size), out / f"syncbn_size{d.size}_rank{d.rank}.pt")


def syncbn_case(rank: int, size: int) -> dict:
    """Rank 0 takes images 0-1 of a batch of 6, rank 1 images 2-5: two training forwards, backward, one eval forward.

    On one rank (no launcher) the whole batch through plain BatchNorm: the reference.
    """
    torch.manual_seed(0)
    nn = torch.nn
    # A 2D BatchNorm (the classifiers) and a 3D one inside a nested block (the U-Net's). No conv bias before a
    # BatchNorm (as in the U-Net): its gradient is zero in exact arithmetic, rounding noise in practice.
    block3d = nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv3d(1, 2, 1, bias=False), nn.BatchNorm3d(2))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), block3d)
    converted = sync_batch_norm(model, torch.device("cpu"))
    x = torch.randn(6, 3, 9, 7, generator=torch.Generator().manual_seed(1)) * 3 + 2
    half = slice(None) if size == 1 else (slice(0, 2) if rank == 0 else slice(2, 6))
    model.train()
    ys = [model(x[half] * (1 + k)) for k in range(2)]  # two batches: the running statistics move twice
    # A fixed random weighting (not sum(y^2): that is constant under a BatchNorm, its gradient only rounding noise).
    w = torch.randn((6, *ys[1].shape[1:]), generator=torch.Generator().manual_seed(3))[half]
    (ys[1] * w).sum().backward()
    grads = {k: dist.allreduce(p.grad) for k, p in model.named_parameters()}  # summed: the whole batch's loss
    model.eval()
    res = {"y": [y.detach() for y in ys], "eval": model(x[half]).detach(), "grads": grads, "converted": converted}
    return {**res, "state": model.state_dict()}


def nan(out: Path) -> None:
    """Rank 1's loss turns NaN at its 4th micro-batch: every rank must stop with FloatingPointError, none hang."""
    d = dist.init(threads=1)
    calls = []

    def bad_step(model, batch, device):
        loss, n = step_fn(model, batch, device)
        calls.append(1)
        return (loss * float("nan") if d.rank == 1 and len(calls) == 4 else loss), n

    cfg = TrainConfig(run_dir=str(out / "run"), epochs=1, batch_size_per_gpu=4, progress=False)
    try:
        fit(Run(ToyNet(8), data.train_loader(make_blobs(64), 4), data.eval_loader(make_blobs(8), 4), bad_step, eval_fn,
                ToyMetric), cfg)  # fmt: skip
    except FloatingPointError as e:
        (out / f"nan_rank{d.rank}.txt").write_text(str(e))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["collectives", "train", "streams", "syncbn", "nan"])
    p.add_argument("out", type=Path)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--simulate-gpus", type=int, default=1)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "train":
        train(a.out, a.batch, a.simulate_gpus, a.accum, a.dropout)
    elif a.what == "streams":
        streams(a.out, a.simulate_gpus)
    else:
        {"collectives": collectives, "syncbn": syncbn, "nan": nan}[a.what](a.out)
