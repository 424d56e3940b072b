"""Shared test helpers: launching real multi-rank jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs._launch import DEFAULT, horovodrun_cmd

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

torch.set_num_threads(1)


def run_cmd(cmd: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` from the repo root with the venv on PATH; fail the test with its output on a non-zero exit."""
    full_env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"
        )
    return p


def launch(np_: int, args: list[str], backend: str = "default", timeout: int = 300) -> subprocess.CompletedProcess:
    """`horovodrun -np N ... python ARGS`, or plain `mpirun` for backend 'mpirun'.

    'default' is the repository's measured launch (`jobs._launch.DEFAULT`: controller and transport settings);
    'gloo' and 'mpi' are bare `horovodrun --gloo|--mpi`.
    """
    env = None
    if backend == "mpirun":
        cmd = [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(np_),
            "-bind-to",
            "none",
            "-x",
            "PATH",
            "-x",
            "PYTHONPATH",
            "-x",
            "OMP_NUM_THREADS",
            sys.executable,
            *args,
        ]
    elif backend == "default":
        cmd, env = horovodrun_cmd(np_, [sys.executable, *args], DEFAULT), DEFAULT.env
    else:
        cmd = ["horovodrun", "-np", str(np_), f"--{backend}", sys.executable, *args]
    return run_cmd(cmd, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
