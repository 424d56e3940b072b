"""How this repository launches Horovod ranks on one machine: the controller and the transport settings, in one place.

    python -m jobs._launch -np 2 python -m jobs.train_unet --config ...   # what `make demo` and the benchmarks run
    python -m jobs._launch --show                                        # print the settings and the command

The defaults (`python -m jobs.bench_allreduce` and `python -m jobs.bench_unet --launch ...` print the A/B tables):

* MPI, not Gloo: on one node OpenMPI's shared-memory transport (vader) with its single-copy mechanism (CMA,
  `process_vm_readv`: one copy per message instead of two through a bounce buffer) against Gloo's loopback TCP
  (copies through the kernel). In the least contended run on the 2-core dev machine MPI reached 45-50% of memcpy at
  16-64 MiB and Gloo 24%; the other engineers' jobs made every figure there noisy, so rerun on a quiet machine.
* MPI waits by yielding the core (`mpi_yield_when_idle`), and Horovod handles are awaited with short sleeps
  (`hvdtrain.dist.wait_quietly`): with as many ranks as cores, spinning waits starve the peer's compute.
* The shared-memory settings travel as `OMPI_MCA_*` variables, so `horovodrun --mpi`, plain `mpirun` and `srun`
  all take them from the environment.

Jobs themselves never need this module: `horovodrun -np N python -m jobs.X` works as documented; this adds the
measured settings.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LaunchSettings", "DEFAULT", "GLOO", "NAMED", "child_env", "horovodrun_cmd", "main"]


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
DEFAULT = LaunchSettings("mpi", _MPI_ENV)
GLOO = LaunchSettings("gloo")
# Candidates the benchmarks compare by name (`--launch`); "default" is the one above.
NAMED = {
    "default": DEFAULT,
    "gloo": GLOO,
    "mpi-bare": LaunchSettings("mpi"),
    "mpi-spin": LaunchSettings("mpi", {**_MPI_ENV, "OMPI_MCA_mpi_yield_when_idle": "0"}),
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
