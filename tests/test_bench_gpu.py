"""`python -m jobs.bench_gpu --dry-run`: every code path of the GPU benchmark, tiny sizes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cmd


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench_gpu") / "figures.json"
    p = run_cmd([sys.executable, "-m", "jobs.bench_gpu", "--dry-run", "--json", str(out)], timeout=600)
    return p.stdout, json.loads(out.read_text())


def test_dry_run_measures_every_section(dry_run):
    stdout, res = dry_run
    assert res["errors"] == {}
    assert res["device"] == "cpu (dry run)" and res["sizes"]["patch"] == [16, 16, 16]
    ours = res["unet"]["ours"]
    assert ours["voxels_per_s"] > 0 and 0 <= ours["data_share"] < 1
    assert "monai" in res["unet"]  # measured, or skipped with the reason
    for name in ("resnet50", "mobilenet_v2"):
        assert res[name]["ours"]["samples_per_s"] > 0 and res[name]["plain"]["samples_per_s"] > 0
    rows = res["allreduce"]["rows"]
    assert [r["mib"] for r in rows] == [1] and rows[0]["horovod_gbps"] > 0 and rows[0]["torch_gbps"] > 0
    assert res["allreduce"]["torch_backend"] == "gloo"
    for line in ("U-Net (16, 16, 16) x batch 2: ours", "resnet50: ours", "mobilenet_v2: ours", "   1 MiB: Horovod"):
        assert line in stdout
    assert "FAILED" not in stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_it_stops_with_a_clear_message():
    p = subprocess.run([sys.executable, "-m", "jobs.bench_gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "no CUDA GPU visible" in p.stderr and "--dry-run" in p.stderr
