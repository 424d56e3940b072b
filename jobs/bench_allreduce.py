"""Horovod allreduce time and bus bandwidth against message size, for Gloo and MPI and fusion/cycle settings.

    python -m jobs.bench_allreduce                       # launches itself under horovodrun -np 2 per setting
    python -m jobs.bench_allreduce --np 4 --max-mib 16

Bus bandwidth is NCCL's convention, size x 2 (n - 1) / n / time: what each link carries in a ring allreduce, so
numbers for different rank counts compare, and compare with the memcpy bandwidth printed beside them (on one node
the ranks exchange through shared memory, so memcpy is the physical ceiling). The fusion test submits many small
tensors at once, as a backward pass does: Horovod fuses them into one buffer up to HOROVOD_FUSION_THRESHOLD bytes
every HOROVOD_CYCLE_TIME ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from jobs._launch import child_env

# (label, launcher flag, extra environment)
SETTINGS = [
    ("gloo", "--gloo", {}),
    ("mpi", "--mpi", {}),
    ("gloo, no fusion", "--gloo", {"HOROVOD_FUSION_THRESHOLD": "0"}),
    ("gloo, cycle 5 ms", "--gloo", {"HOROVOD_CYCLE_TIME": "5"}),
]


def memcpy_gbps(nbytes: int = 64 << 20, reps: int = 20) -> float:
    """Copy bandwidth of one core (read + write counted once, as a message's bytes are)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


def _time(fn, min_time: float = 0.2, max_iters: int = 1000) -> float:
    """Seconds per call: a few warm-up calls, then enough calls to fill `min_time` (agreed across ranks)."""
    import horovod.torch as hvd

    for _ in range(3):
        fn()
    t0, iters = time.perf_counter(), 0
    while iters < max_iters:
        fn()
        iters += 1
        # Every rank must run the same number of collectives: rank 0 decides when to stop.
        if iters % 5 == 0:
            stop = hvd.broadcast_object(time.perf_counter() - t0 >= min_time, root_rank=0, name="stop")
            if stop:
                break
    return (time.perf_counter() - t0) / iters


def worker(out: Path, max_mib: int) -> None:
    import horovod.torch as hvd  # the benchmark measures Horovod itself, so it calls it directly

    hvd.init()
    torch.set_num_threads(1)
    n = hvd.size()
    rows = []
    size = 1024
    while size <= max_mib << 20:
        t = torch.ones(size // 4, dtype=torch.float32)
        sec = _time(lambda t=t, size=size: hvd.allreduce(t, op=hvd.Sum, name=f"ar{size}"))
        rows.append({"bytes": size, "time_s": sec, "busbw_gbps": size * 2 * (n - 1) / n / sec / 1e9})
        size *= 4
    # A backward pass's worth of small gradients: 128 tensors of 64 KiB submitted together (8 MiB in all).
    grads = [torch.ones(16384) for _ in range(128)]

    def many() -> None:
        handles = [hvd.allreduce_async(g, op=hvd.Sum, name=f"g{i}") for i, g in enumerate(grads)]
        for h in handles:
            hvd.synchronize(h)

    sec = _time(many, min_time=0.3, max_iters=200)
    fused = {
        "tensors": len(grads),
        "bytes": 128 * 65536,
        "time_s": sec,
        "busbw_gbps": 8 * 2**20 * 2 * (n - 1) / n / sec / 1e9,
    }
    if hvd.rank() == 0:
        out.write_text(json.dumps({"size": n, "rows": rows, "fused": fused}))


def _fmt_bytes(b: int) -> str:
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--max-mib", type=int, default=64, help="largest message in MiB (default 64)")
    p.add_argument("--settings", default="", help="comma-separated subset of: " + ", ".join(s[0] for s in SETTINGS))
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.max_mib)
        return {}
    chosen = [s for s in SETTINGS if not a.settings or s[0] in a.settings.split(",")]
    mem = memcpy_gbps()
    print(f"memcpy bandwidth (one core, 64 MiB): {mem:.2f} GB/s  <- the ceiling for ranks on one node", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, flag, env in chosen:
            out = Path(tmp) / f"{len(results)}.json"
            cmd = ["horovodrun", "-np", str(a.np), flag, sys.executable, "-m", "jobs.bench_allreduce"]
            cmd += ["--worker", str(out), "--max-mib", str(a.max_mib)]
            proc = subprocess.run(cmd, env=child_env(**env), capture_output=True, text=True, timeout=900)
            if proc.returncode != 0 or not out.is_file():
                print(f"{label}: failed (exit {proc.returncode})\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                continue
            results[label] = json.loads(out.read_text())
    if not results:
        raise SystemExit("bench_allreduce: no setting ran")
    labels = list(results)
    sizes = [r["bytes"] for r in next(iter(results.values()))["rows"]]
    print(f"\nallreduce of one float32 tensor, {a.np} ranks: time (us) / bus bandwidth (GB/s)")
    print(f"{'size':>8} | " + " | ".join(f"{lab:>22}" for lab in labels))
    for i, size in enumerate(sizes):
        cells = [results[lab]["rows"][i] for lab in labels]
        print(
            f"{_fmt_bytes(size):>8} | "
            + " | ".join(f"{c['time_s'] * 1e6:>10.1f} / {c['busbw_gbps']:>9.3f}" for c in cells)
        )
    print("\n128 gradients of 64 KiB at once (fusion): time (ms) / bus bandwidth (GB/s)")
    for lab in labels:
        f = results[lab]["fused"]
        print(f"{lab:>22}: {f['time_s'] * 1e3:8.2f} ms / {f['busbw_gbps']:.3f} GB/s")
    big = {lab: results[lab]["rows"][-1]["busbw_gbps"] for lab in labels}
    print("\nlargest message: " + ", ".join(f"{lab} {v:.2f} GB/s ({v / mem:.0%} of memcpy)" for lab, v in big.items()))
    return {"memcpy_gbps": mem, "results": results}


if __name__ == "__main__":
    main()
