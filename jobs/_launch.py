"""How this repository launches Horovod ranks on one machine: the controller and the transport settings, in one place.

    python -m jobs._launch -np 2 python -m jobs.train_unet --config ...   # what `make demo` and the benchmarks run
    python -m jobs._launch --show                                        # print the settings and the command

The defaults (`python -m jobs.bench_allreduce` and `python -m jobs.bench_unet --launch ...` print the A/B tables):

* MPI, not Gloo: on one node OpenMPI's shared-memory transport (vader) with its single-copy mechanism (CMA,
  `process_vm_readv`: one copy per message instead of two through a bounce buffer) against Gloo's loopback TCP
  (copies through the kernel).
* MPI waits by yielding the core (`mpi_yield_when_idle`), and Horovod handles are awaited with short sleeps
  (`hvdtrain.dist.wait_quietly`): with as many ranks as cores, spinning waits starve the peer's compute.
* Transparent huge pages for glibc's allocations, freed memory kept in the heap, a 0.2 ms Horovod cycle and
  OpenMPI's ring allreduce: together they took the 16 MiB allreduce from 13-17% of one core's memcpy to over 25%
  (docs/RESULTS.md has the table, each choice removed in turn).
* The settings travel as environment variables (`OMPI_MCA_*`, `HOROVOD_*`, glibc's), so `horovodrun --mpi`,
  plain `mpirun` and `srun` all take them from the environment.

Jobs themselves never need this module: `horovodrun -np N python -m jobs.X` works as documented; this adds the
measured settings.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LaunchSettings",
    "DEFAULT",
    "GLOO",
    "NAMED",
    "without",
    "child_env",
    "horovodrun_cmd",
    "run_together",
    "main",
]


@dataclass(frozen=True)
class LaunchSettings:
    """A controller (`mpi` or `gloo`) and the environment its ranks get."""

    controller: str
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"--{self.controller}" + "".join(f" {k}={v}" for k, v in sorted(self.env.items()))


# OpenMPI's shared-memory transport between ranks of one node; the single-copy mechanism moves a large message
# with one process_vm_readv instead of two copies through a shared bounce buffer (needs ptrace rights between
# the ranks; OpenMPI falls back to the copy-in/copy-out path when the container forbids it).
# mpi_yield_when_idle: MPI's progress loop yields the core while it waits. Horovod's background thread runs a small
# coordination allreduce every cycle, and with ranks >= cores a rank that waits there would spin on the core its
# peer needs to compute (in bench_unet's A/B it beat the spinning variant, "mpi-spin").
_MPI_ENV = {"OMPI_MCA_btl_vader_single_copy_mechanism": "cma", "OMPI_MCA_mpi_yield_when_idle": "1"}
# Transparent huge pages for what glibc allocates (tensors, OpenMPI's temporaries): process_vm_readv pins and
# walks the peer's pages one by one, 512 times fewer of them with 2 MiB pages (16 MiB allreduce 2-3x faster in
# bench_allreduce; the kernel must allow THP on madvise, the usual setting). Freed blocks stay in the heap: OpenMPI
# mallocs a temporary as large as the message on every allreduce, and glibc's default returns it to the kernel,
# so every call page-faulted fresh (zeroed) pages.
_ALLOC_ENV = {
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str((1 << 32) - 1),
}
# Horovod's background loop looks for ready tensors every cycle (default 1 ms): the cycle is the latency floor of a
# small collective (1 KiB: 1.1 ms -> 0.5 ms in bench_allreduce).
_CYCLE_ENV = {"HOROVOD_CYCLE_TIME": "0.2"}
# OpenMPI's ring allreduce (reduce-scatter + allgather: each rank moves (N-1)/N of the message twice) instead of the
# tuned component's built-in choice, which on one node with 2 ranks was slower at 1-64 MiB and for fused gradients.
_RING_ENV = {"OMPI_MCA_coll_tuned_use_dynamic_rules": "1", "OMPI_MCA_coll_tuned_allreduce_algorithm": "4"}
DEFAULT = LaunchSettings("mpi", {**_MPI_ENV, **_ALLOC_ENV, **_CYCLE_ENV, **_RING_ENV})
GLOO = LaunchSettings("gloo", {**_ALLOC_ENV, **_CYCLE_ENV})


def without(settings: LaunchSettings, *keys: str, **extra: str) -> LaunchSettings:
    env = {k: v for k, v in settings.env.items() if k not in keys}
    return LaunchSettings(settings.controller, {**env, **extra})


# Candidates the benchmarks compare by name (`--launch`): the default less one of its choices at a time.
NAMED = {
    "default": DEFAULT,
    "gloo": GLOO,
    "mpi-bare": LaunchSettings("mpi"),
    "mpi-spin": without(DEFAULT, "OMPI_MCA_mpi_yield_when_idle", OMPI_MCA_mpi_yield_when_idle="0"),
    "no-hugepages": without(DEFAULT, *_ALLOC_ENV),
    "cycle-1ms": without(DEFAULT, *_CYCLE_ENV),
    "no-ring": without(DEFAULT, *_RING_ENV),
}


def child_env(settings: LaunchSettings | None = DEFAULT, **extra: str) -> dict[str, str]:
    """os.environ with this interpreter's bin folder first on PATH, OMP_NUM_THREADS=1 and `settings.env`, + `extra`.

    `.venv/bin/python -m jobs.bench_unet` without an activated venv would otherwise find no `horovodrun`
    (or another environment's), and each rank would take every core.
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(filter(None, [bin_dir, os.environ.get("PATH")]))
    env = settings.env if settings is not None else {}
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **env, **extra}


def horovodrun_cmd(np_: int, argv: list[str], settings: LaunchSettings = DEFAULT) -> list[str]:
    """`horovodrun -np N --mpi|--gloo ARGV` (run it with `child_env(settings)`)."""
    return ["horovodrun", "-np", str(np_), f"--{settings.controller}", *argv]


def run_together(cmd: list[str], n: int, what: str, parse=float) -> list:
    """Start `n` copies of `cmd` at once (benchmark workers that each print one result last); their results, each
    last line read by `parse` (default: one number).

    Raises SystemExit naming `what` when a copy fails.
    """
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True, env=child_env()) for _ in range(n)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{what}: a worker process failed: {outs}")
    return [parse(o.strip().splitlines()[-1]) for o in outs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-np", "--np", dest="np_", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--gloo", action="store_true", help="use Gloo instead of the default controller")
    p.add_argument("--show", action="store_true", help="print the settings and the command instead of running it")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command every rank runs")
    a = p.parse_args(argv)
    settings = GLOO if a.gloo else DEFAULT
    command = [sys.executable if c == "python" else c for c in a.command]  # this environment's interpreter
    cmd = horovodrun_cmd(a.np_, command, settings)
    if a.show or not command:
        print(f"launch settings: {settings.describe()}\ncommand: {shlex.join(cmd)}")
        return 0
    env = child_env(settings)
    if "OMP_NUM_THREADS" not in os.environ:  # jobs share the node's cores among the local ranks themselves
        del env["OMP_NUM_THREADS"]
    os.execvpe(cmd[0], cmd, env)  # replaces this process: signals reach horovodrun directly


if __name__ == "__main__":
    sys.exit(main())
