"""hvdtrain's overhead at one rank: the same model and data trained by a plain PyTorch loop and by `hvdtrain.fit`.

    python -m jobs.bench_overhead                  # prints both throughputs and their ratio (target >= 0.97)
    python -m jobs.bench_overhead --steps 200 --repeats 5 --width 64

Both loops draw the same batches from the same sharded loader and run the same SGD steps; hvdtrain adds its
bookkeeping (schedule, preemption check, loss sums kept on the device, per-epoch logging and checkpoint). The runs
alternate, and the median of the repeats is compared, so a noisy neighbour affects both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from hvdtrain import Run, TrainConfig, data, dist, fit
from hvdtrain.testing import ToyMetric, ToyNet, eval_fn, make_blobs, step_fn


def plain(dataset, batch: int, lr: float, width: int, seed: int) -> float:
    """Samples/s of the textbook loop: forward, loss, backward, step."""
    torch.manual_seed(seed)
    model = ToyNet(width)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = data.train_loader(dataset, batch, seed)
    model.train()
    t0, n = time.perf_counter(), 0
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(y)
    return n / (time.perf_counter() - t0)


def hvdtrain_fit(dataset, val, batch: int, lr: float, width: int, seed: int) -> float:
    """Samples/s of one `fit` epoch (training time only, as fit reports it)."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(
            run_dir=run_dir, epochs=1, batch_size_per_gpu=batch, lr=lr, lr_rule="none", warmup_epochs=0,
            schedule="constant", optimizer="sgd", weight_decay=0.0, progress=False, seed=seed,
        )  # fmt: skip
        loader = data.train_loader(dataset, batch, seed)
        summary = fit(Run(ToyNet(width), loader, val, step_fn, eval_fn, ToyMetric, monitor="loss", mode="min"), cfg)
    return summary["samples_per_s"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per timed run")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--width", type=int, default=32, help="ToyNet channels (compute per step)")
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--repeats", type=int, default=5, help="alternating timed runs of each loop")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    a = p.parse_args(argv)
    d = dist.init(a.threads or None)
    if d.size != 1:
        raise SystemExit("bench_overhead compares loops at one rank: run it with plain python, not a launcher")
    dataset = make_blobs(a.steps * a.batch, a.size, seed=0)
    val = data.eval_loader(make_blobs(64, a.size, seed=1), 64)
    # One warm-up of each (allocator, thread pools, first-call dispatch).
    plain(dataset, a.batch, 0.01, a.width, 0)
    hvdtrain_fit(dataset, val, a.batch, 0.01, a.width, 0)
    p_runs, h_runs = [], []
    for r in range(a.repeats):
        p_runs.append(plain(dataset, a.batch, 0.01, a.width, r))
        h_runs.append(hvdtrain_fit(dataset, val, a.batch, 0.01, a.width, r))
    p_med, h_med = statistics.median(p_runs), statistics.median(h_runs)
    ratio = h_med / p_med
    print(
        f"{a.steps} steps x batch {a.batch}, ToyNet width {a.width}, {a.size}x{a.size} images, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"plain PyTorch: {p_med:9.1f} samples/s  (runs: {', '.join(f'{x:.0f}' for x in p_runs)})")
    print(f"hvdtrain.fit : {h_med:9.1f} samples/s  (runs: {', '.join(f'{x:.0f}' for x in h_runs)})")
    print(f"ratio hvdtrain / plain = {ratio:.3f}  (target >= 0.97: {'met' if ratio >= 0.97 else 'NOT met'})")
    return {"plain": p_med, "hvdtrain": h_med, "ratio": ratio}


if __name__ == "__main__":
    main()
