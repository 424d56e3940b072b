"""Benchmarks that launch Horovod jobs work from the venv's python without an activated venv."""

from __future__ import annotations

import json
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
        [
            sys.executable,
            "-m",
            "jobs.bench_allreduce",
            "--max-mib",
            "1",
            "--settings",
            "default,gloo",
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "1 MiB GB/s" in p.stdout and "*                  default |" in p.stdout and "gloo |" in p.stdout


def test_default_launch_is_one_place_for_the_controller_and_transport():
    from jobs._launch import DEFAULT, GLOO, horovodrun_cmd

    cmd = horovodrun_cmd(2, ["python", "x.py"])
    assert cmd == ["horovodrun", "-np", "2", f"--{DEFAULT.controller}", "python", "x.py"]
    assert horovodrun_cmd(2, ["y"], GLOO)[3] == "--gloo"
    env = child_env()
    assert all(env[k] == v for k, v in DEFAULT.env.items())
    assert child_env(GLOO).get("OMPI_MCA_btl_vader_single_copy_mechanism") == os.environ.get(
        "OMPI_MCA_btl_vader_single_copy_mechanism"
    )


def test_launch_show_prints_the_command():
    p = subprocess.run(
        [sys.executable, "-m", "jobs._launch", "--show", "-np", "2", "python", "-m", "jobs.demo"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "launch settings: --mpi" in p.stdout and f"horovodrun -np 2 --mpi {sys.executable} -m jobs.demo" in p.stdout


@pytest.mark.multirank
def test_launch_runs_two_ranks_with_the_default_settings(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jobs._launch", "-np", "2", "python", "tests/hvd_worker.py", "collectives"]
    p = subprocess.run([*cmd, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    results = [json.loads((tmp_path / f"collectives_{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["size"]) for r in results] == [(0, 2), (1, 2)]
    assert results[0]["sum_tensor"] == [2.0, 1.0]
