"""Benchmarks that launch Horovod jobs work from the venv's python without an activated venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from jobs._launch import child_env


def test_child_env_puts_this_interpreters_tools_first(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    env = child_env(HOROVOD_CYCLE_TIME="5")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert shutil.which("horovodrun", path=env["PATH"]) == str(Path(sys.executable).parent / "horovodrun")
    assert env["OMP_NUM_THREADS"] == "1" and env["HOROVOD_CYCLE_TIME"] == "5"


@pytest.mark.multirank
def test_bench_allreduce_runs_without_the_venv_on_path():
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "jobs.bench_allreduce", "--max-mib", "1", "--settings", "gloo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "1 MiB |" in p.stdout and "largest message: gloo" in p.stdout
