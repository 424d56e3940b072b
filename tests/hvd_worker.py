"""Run under a launcher by tests/test_hvd_multirank.py (also as one plain process): checks that need real ranks.

python tests/hvd_worker.py collectives OUT
python tests/hvd_worker.py train OUT --batch B [--simulate-gpus N] [--accum K]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvdtrain import TrainConfig, data, dist, fit
from hvdtrain.metrics import SumMetric
from hvdtrain.toy import ToyMetric, ToyNet, eval_fn, make_blobs, step_fn


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


def train(out: Path, batch: int, simulate_gpus: int, accum: int) -> None:
    d = dist.init(threads=1)
    torch.manual_seed(0)
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
    loader = data.train_loader(make_blobs(96, seed=3), batch, seed=7, micro_per_step=accum * simulate_gpus)
    val = data.eval_loader(make_blobs(10, seed=4), 4)
    model = ToyNet(8, dropout=0.0)  # no dropout: masks would differ between batch layouts
    fit(model, loader, val, step_fn, eval_fn, ToyMetric, cfg, monitor="loss", mode="min")
    torch.save(model.state_dict(), out / f"weights_rank{d.rank}.pt")


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
        fit(ToyNet(8), data.train_loader(make_blobs(64), 4), data.eval_loader(make_blobs(8), 4), bad_step, eval_fn,
            ToyMetric, cfg)  # fmt: skip
    except FloatingPointError as e:
        (out / f"nan_rank{d.rank}.txt").write_text(str(e))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["collectives", "train", "nan"])
    p.add_argument("out", type=Path)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--simulate-gpus", type=int, default=1)
    p.add_argument("--accum", type=int, default=1)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "train":
        train(a.out, a.batch, a.simulate_gpus, a.accum)
    else:
        {"collectives": collectives, "nan": nan}[a.what](a.out)
