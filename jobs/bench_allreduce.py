"""Horovod allreduce time and bus bandwidth against message size, for each launch setting tried, vs memcpy.

    python -m jobs.bench_allreduce                       # every setting, horovodrun -np 2, 1 KiB-64 MiB
    python -m jobs.bench_allreduce --settings default,gloo --max-mib 16

Each setting (controller, OpenMPI transport, Horovod cycle time, how the caller waits) launches this file under
`horovodrun`; the table compares them, marks the repository's default (`jobs._launch.DEFAULT`, what `make demo`,
the benchmarks and the tests use) and says whether it reaches the bar (bus bandwidth >= 25% of memcpy at
16 or 64 MiB). Messages are reduced in place (`hvd.allreduce_`), as `hvd.DistributedOptimizer` reduces
gradients, with op=Sum as nccl-tests measure (`--op average`: Horovod then scales the result in a second pass over
the buffer, as DistributedOptimizer's default average does). Each measurement runs a number of calls agreed by the
ranks before the clock starts, with no other collective in the timed loop.

Bus bandwidth is NCCL's convention, size x 2 (n - 1) / n / time: what each link carries in a ring allreduce, so
numbers for different rank counts compare, and compare with the memcpy bandwidth printed beside them (on one node
the ranks exchange through shared memory, so memcpy is the physical ceiling). The fusion test submits many small
tensors at once, as a backward pass does: Horovod fuses them into one buffer up to HOROVOD_FUSION_THRESHOLD bytes
every HOROVOD_CYCLE_TIME ms.

Waiting: `hvd.synchronize` spins (`std::this_thread::yield`) until the background thread is done; with as many
ranks as cores, the spinning main threads take the cores the background threads (MPI's progress loop) need.
"sleep-wait" polls with short sleeps instead, as `hvdtrain.dist.synchronize` does in training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs._launch import DEFAULT, GLOO, NAMED, LaunchSettings, child_env, horovodrun_cmd, without

BAR = 0.25  # bus bandwidth / memcpy at 16 or 64 MiB
SIZES = [1 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


@dataclass(frozen=True)
class Setting:
    label: str
    launch: LaunchSettings
    wait: str = "sleep"  # how the caller waits for a handle: "sleep" (poll + sleep) or "spin" (hvd.synchronize)


def _algorithm(n: int) -> dict[str, str]:
    """OpenMPI's allreduce algorithm forced (3 recursive doubling, 4 ring, 6 Rabenseifner) instead of its rules."""
    return {"OMPI_MCA_coll_tuned_use_dynamic_rules": "1", "OMPI_MCA_coll_tuned_allreduce_algorithm": str(n)}


def _default_with(**env: str) -> LaunchSettings:
    return LaunchSettings("mpi", {**DEFAULT.env, **env})


# The default, then the default less one of its choices at a time (jobs/_launch.py says why each is there), then
# other OpenMPI collectives and Horovod knobs on top of it.
SETTINGS = [
    Setting("default", DEFAULT),
    Setting("default spin-wait", DEFAULT, "spin"),
    Setting("gloo", GLOO),
    Setting("gloo spin-wait", GLOO, "spin"),
    Setting("mpi bare", NAMED["mpi-bare"]),
    Setting("mpi spin", NAMED["mpi-spin"]),
    Setting("no single-copy", _default_with(OMPI_MCA_btl_vader_single_copy_mechanism="none")),
    Setting("no hugepages/malloc-keep", NAMED["no-hugepages"]),
    Setting("no hugepages", without(DEFAULT, "GLIBC_TUNABLES")),
    Setting("no malloc-keep", without(DEFAULT, "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")),
    Setting("cycle 1ms", NAMED["cycle-1ms"]),
    Setting("cycle 5ms", _default_with(HOROVOD_CYCLE_TIME="5")),
    Setting("no fusion", _default_with(HOROVOD_FUSION_THRESHOLD="0")),
    Setting("no ring (tuned's choice)", NAMED["no-ring"]),
    Setting("rec-doubling", _default_with(**_algorithm(3))),
    Setting("rabenseifner", _default_with(**_algorithm(6))),
    # OpenMPI's shared-memory collective component (off by default: priority 0), larger fragments than its 8 KiB.
    Setting(
        "coll-sm",
        _default_with(
            OMPI_MCA_coll_sm_priority="100",
            OMPI_MCA_coll_sm_fragment_size="65536",
            OMPI_MCA_coll_sm_comm_num_segments="16",
        ),
    ),
]


def memcpy_gbps(nbytes: int = 64 << 20, reps: int = 20) -> float:
    """Copy bandwidth of one core (read + write counted once, as a message's bytes are)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as each rank has: torch's copy_ is multi-threaded otherwise
    try:
        dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        return nbytes * reps / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(threads)


def wait_all(hvd, handles: list, wait: str) -> None:
    """Wait for Horovod handles; "sleep" leaves the core to the background threads while it waits."""
    if wait == "sleep":
        for h in handles:
            while not hvd.poll(h):
                time.sleep(20e-6)
    for h in handles:
        hvd.synchronize(h)


def _time(fn, min_time: float, max_iters: int = 1000) -> float:
    """Seconds per call: warm-up calls, then a number of calls agreed by all ranks up front, timed with no other
    collective inside the timed loop (a stop-flag broadcast every few calls would add its own cycles to the time)."""
    import horovod.torch as hvd

    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    guess = (time.perf_counter() - t0) / 3
    iters = int(hvd.broadcast_object(min(max_iters, max(5, int(min_time / max(guess, 1e-6)))), 0, name="iters"))
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def worker(out: Path, max_mib: int, wait: str, min_time: float, op: str = "sum") -> None:
    import horovod.torch as hvd  # the benchmark measures Horovod itself, so it calls it directly

    OPS = {"sum": hvd.Sum, "average": hvd.Average}

    hvd.init()
    torch.set_num_threads(1)
    n = hvd.size()
    rows = []
    for size in (s for s in SIZES if s <= max_mib << 20):
        t = torch.ones(size // 4, dtype=torch.float32)

        def one(t=t, size=size) -> None:
            wait_all(hvd, [hvd.allreduce_async_(t, name=f"ar{size}", op=OPS[op])], wait)

        sec = _time(one, min_time)
        rows.append({"bytes": size, "time_s": sec, "busbw_gbps": size * 2 * (n - 1) / n / sec / 1e9})
    # A backward pass's worth of small gradients: 128 tensors of 64 KiB submitted together (8 MiB in all).
    grads = [torch.ones(16384) for _ in range(128)]

    def many() -> None:
        wait_all(hvd, [hvd.allreduce_async_(g, name=f"g{i}", op=OPS[op]) for i, g in enumerate(grads)], wait)

    sec = _time(many, min_time=1.5 * min_time, max_iters=200)
    fused = {"tensors": len(grads), "bytes": 128 * 65536, "time_s": sec}
    if hvd.rank() == 0:
        out.write_text(json.dumps({"size": n, "mpi": hvd.mpi_enabled(), "rows": rows, "fused": fused}))


def _fmt_bytes(b: int) -> str:
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"


def run_setting(s: Setting, np_: int, max_mib: int, min_time: float, out: Path, op: str = "sum") -> dict | None:
    argv = [sys.executable, "-m", "jobs.bench_allreduce", "--worker", str(out), "--max-mib", str(max_mib)]
    argv += ["--wait", s.wait, "--min-time", str(min_time), "--op", op]
    proc = subprocess.run(
        horovodrun_cmd(np_, argv, s.launch), env=child_env(s.launch), capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0 or not out.is_file():
        print(f"{s.label}: failed (exit {proc.returncode})\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(out.read_text())


def _best(old: dict | None, new: dict) -> dict:
    """Per message size, the faster of two runs of one setting."""
    if old is None:
        return new
    rows = [min(a, b, key=lambda r: r["time_s"]) for a, b in zip(old["rows"], new["rows"])]
    return {**new, "rows": rows, "fused": min(old["fused"], new["fused"], key=lambda f: f["time_s"])}


def print_table(results: dict[str, dict], mem: float, np_: int, op: str = "sum") -> None:
    sizes = [r["bytes"] for r in next(iter(results.values()))["rows"]]
    small = [s for s in sizes if s < 1 << 20]
    large = [s for s in sizes if s >= 1 << 20]
    print(f"\nallreduce in place ({op}), one float32 tensor, {np_} ranks; memcpy {mem:.2f} GB/s; * = the default")
    head = [f"{_fmt_bytes(s)} us" for s in small] + [f"{_fmt_bytes(s)} GB/s" for s in large]
    print(f"{'setting':>26} | " + " | ".join(f"{h:>11}" for h in head) + " | 128x64KiB ms | best % memcpy")
    for lab, res in results.items():
        by = {r["bytes"]: r for r in res["rows"]}
        cells = [f"{by[s]['time_s'] * 1e6:>11.1f}" for s in small] + [f"{by[s]['busbw_gbps']:>11.3f}" for s in large]
        best = max((by[s]["busbw_gbps"] for s in large if s >= 16 << 20), default=0.0)
        mark = "*" if lab == "default" else " "
        fused = res["fused"]["time_s"] * 1e3
        print(f"{mark}{lab:>25} | " + " | ".join(cells) + f" | {fused:>11.2f} | {best / mem:>12.0%}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--max-mib", type=int, default=64, help="largest message in MiB (default 64)")
    p.add_argument("--settings", default="", help="comma-separated subset of: " + ",".join(s.label for s in SETTINGS))
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement (default 0.2)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting, interleaved; the best is kept")
    p.add_argument(
        "--op",
        default="sum",
        choices=("sum", "average"),
        help="reduction (default sum, as nccl-tests measure; average adds a scaling pass over the result)",
    )
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--wait", default="sleep", choices=("sleep", "spin"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.max_mib, a.wait, a.min_time, a.op)
        return {}
    wanted = [w.strip() for w in a.settings.split(",") if w.strip()]
    unknown = set(wanted) - {s.label for s in SETTINGS}
    if unknown:
        raise SystemExit(
            f"bench_allreduce: unknown setting(s) {sorted(unknown)}; choose from {[s.label for s in SETTINGS]}"
        )
    chosen = [s for s in SETTINGS if not wanted or s.label in wanted]
    mem = memcpy_gbps()
    print(f"memcpy bandwidth (one core, 64 MiB): {mem:.2f} GB/s  <- the ceiling for ranks on one node", flush=True)
    print(f"default launch: {DEFAULT.describe()} (jobs/_launch.py)", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):  # settings interleaved, best of the repeats: a busy neighbour only slows
            mem = max(mem, memcpy_gbps()) if rep else mem  # the ceiling too is the best of the repeats
            for i, s in enumerate(chosen):
                res = run_setting(s, a.np, a.max_mib, a.min_time, Path(tmp) / f"{rep}-{i}.json", a.op)
                if res is not None:
                    results[s.label] = _best(results.get(s.label), res)
                    print(f"  ran {s.label} ({rep + 1}/{a.repeats})", flush=True)
    if not results:
        raise SystemExit("bench_allreduce: no setting ran")
    print_table(results, mem, a.np, a.op)
    verdict = {}
    for lab, res in results.items():
        big = [r["busbw_gbps"] for r in res["rows"] if r["bytes"] >= 16 << 20]
        verdict[lab] = max(big) / mem if big else None
    if verdict.get("default") is not None:
        met = "met" if verdict["default"] >= BAR else "NOT met"
        print(
            f"\ndefault: best bus bandwidth at 16-64 MiB = {verdict['default']:.0%} of memcpy (bar >= {BAR:.0%}: {met})"
        )
    return {"memcpy_gbps": mem, "results": results, "share_of_memcpy": verdict}


if __name__ == "__main__":
    main()
