"""The Dice-scaling benchmark's smoke run (`python -m jobs.bench_scaling --quick`): real ranks, report files, table."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from jobs import bench_scaling


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from conftest import run_cmd

    out = tmp_path_factory.mktemp("bench_scaling")
    p = run_cmd([sys.executable, "-m", "jobs.bench_scaling", "--quick", "--out", str(out)], timeout=300)
    return out, p.stdout


@pytest.mark.multirank  # the 2-rank run goes through horovodrun (jobs._launch)
def test_quick_writes_the_report_files(quick):
    out, _ = quick
    for name in ("scaling.md", "scaling.csv", "time_speedup.png", "dice_relative.png"):
        assert (out / "report" / name).stat().st_size > 0, name
    assert (out / "report" / "time_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multirank
def test_quick_table_has_every_count_real_and_simulated(quick):
    out, stdout = quick
    with open(out / "report" / "scaling.csv") as f:
        kinds = {(int(r["gpus"]), r["kind"]) for r in csv.DictReader(f) if r["kind"] != "predicted"}
    assert kinds == {(1, "real"), (2, "real"), (2, "simulated"), (4, "simulated")}
    summary = json.loads((out / "bench_scaling.json").read_text())
    rows = {(r["gpus"], r["mode"]): r for r in summary["rows"]}
    assert set(rows) == kinds
    for (gpus, _), r in rows.items():
        assert r["global_batch"] == 2 * gpus  # the preset's 2 patches per GPU; only the GPU count changes
        assert r["updates"] == 2 * 256 // r["global_batch"]  # 2 epochs of 16 volumes x 16 patches
        assert 0.0 <= r["best_dice"] <= 1.0
    assert rows[(1, "real")]["dice_rel"] == pytest.approx(1.0)
    assert "bar: every simulated count keeps >= 98%" in stdout
    assert "model: out-of-sample error (fit on 1 rank, predicting 2 ranks): " in stdout
    assert summary["model_check"] and "15% target" in summary["model_check"][0]
    for gpus, mode in kinds:
        assert any(line.split("|")[:2] == [f"{gpus:>4} ", f" {mode:<9} "] for line in stdout.splitlines())


def test_plan_and_bad_batch():
    runs = bench_scaling.plan([1, 2, 64], [2])
    assert [(r.ranks, r.simulate, r.mode) for r in runs] == [
        (1, 1, "real"),
        (2, 1, "real"),
        (1, 2, "simulated"),
        (1, 64, "simulated"),
    ]
    preset = {"samples_per_volume": 4, "batch_size_per_gpu": 2}
    with pytest.raises(bench_scaling.BenchError, match="global batch 128 is more than the 64 patches"):
        bench_scaling.check_batches(runs, preset, n_train=16)


def test_verdict():
    rows = [
        {"gpus": 1, "mode": "real", "best_dice": 0.90},
        {"gpus": 2, "mode": "simulated", "best_dice": 0.89},
        {"gpus": 64, "mode": "simulated", "best_dice": 0.87},
    ]
    assert bench_scaling.add_relative(rows) == 0.90
    met, how = bench_scaling.verdict(rows)
    assert not met and "below at 64" in how
    rows[2]["dice_rel"] = 0.985
    assert bench_scaling.verdict(rows)[0]


def test_model_check_lines_from_the_report():
    line = "out-of-sample error (fit on 1 rank, predicting 2 ranks): -7.1%, within the 15% target"
    md = f"# Scaling report\n\n**{line}**\n**predicted efficiency at 64 GPUs on study_p100_edr: 50.0%**\n"
    assert bench_scaling.model_check_lines(md) == [line]
    assert bench_scaling.model_check_lines("# Scaling report\n") == []
