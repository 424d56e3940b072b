"""The scaling report on synthetic run folders: rows, numbers, files, predictions and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from jobs import predict_scaling, scaling_report
from scaling.perfmodel import PROFILES
from scaling.report import make_report
from scaling.runs import RunFolderError, grad_bytes_from_checkpoint, load_run

PNG = b"\x89PNG\r\n\x1a\n"
EPOCH_T1 = 12.0  # s per epoch of the real 1-GPU run
BEST = {1: 0.80, 2: 0.79, 4: 0.80, 8: 0.79, 16: 0.78, 32: 0.77, 64: 0.72}


def make_run(
    root: Path,
    name: str,
    world_size: int,
    simulate: int = 1,
    epoch_time: float = EPOCH_T1,
    comm: float = 0.0,
    best: float = 0.8,
    epochs: int = 6,
    batch: int = 2,
    samples: int = 64,
    grad_bytes: float | None = 4e6,
    global_batch: int | None = None,
) -> Path:
    """A run folder as hvdtrain.loop.fit writes it; val Dice rises linearly to `best` at the last epoch.

    With `global_batch` it is a strong-scaling run: `batch` per GPU and the accumulation that makes up the rest.
    """
    d = root / name
    d.mkdir(parents=True)
    gpus = world_size * simulate
    gb = global_batch or batch * gpus
    accum = gb // (batch * gpus)
    scaling = "weak" if global_batch is None else "strong"
    config = {
        "batch_size_per_gpu": batch,
        "accum": accum,
        "simulate_gpus": simulate,
        "world_size": world_size,
        "gpus": gpus,
        "global_batch": gb,
    }
    if global_batch is not None:  # what the trainer records; older run folders have no "scaling"
        config["scaling"] = scaling
    if grad_bytes is not None:
        config["grad_bytes"] = grad_bytes
    (d / "config.json").write_text(json.dumps(config))
    lines = []
    for e in range(epochs):
        common = {"epoch": e, "world_size": world_size, "gpus": gpus, "global_batch": gb}
        lines.append(
            {
                **common,
                "split": "train",
                "time_s": epoch_time,
                "samples": samples,
                "comm_s": comm,
                "compute_s": epoch_time - comm,
                "loss": 1.0 / (e + 1),
            }
        )
        lines.append({**common, "split": "val", "time_s": 0.5, "dice": best * (e + 1) / epochs})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "world_size": world_size,
        "simulate_gpus": simulate,
        "gpus": gpus,
        "batch_size_per_gpu": batch,
        "accum": accum,
        "global_batch": gb,
        "epochs": epochs,
        "epoch_time_s": epoch_time,
        "comm_fraction": comm / epoch_time,
        "monitor": "dice",
        "best_metric": best,
        "best_epoch": epochs - 1,
    }
    if global_batch is not None:
        summary["scaling"] = scaling
    (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # 32 steps/epoch at 1 GPU; the 2-rank run waits 0.5 s per epoch (16 steps) in the allreduce.
    make_run(root, "real_np1", 1, best=BEST[1])
    make_run(root, "real_np2", 2, epoch_time=6.5, comm=0.5, best=BEST[2])
    for g in (4, 8, 16, 32, 64):
        make_run(root, f"sim_{g}", 1, simulate=g, epoch_time=11.0, best=BEST[g])
    return root


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_rows_numbers_and_files(runs: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    rep = make_report([runs], out)
    for name in ("scaling.md", "scaling.csv", "time_speedup.png", "dice_relative.png"):
        assert (out / name).is_file(), name
    for name in ("time_speedup.png", "dice_relative.png"):
        assert (out / name).read_bytes()[:8] == PNG
    rows = _csv(out / "scaling.csv")
    assert [(int(r["gpus"]), r["kind"]) for r in rows] == [(1, "real"), (2, "real")] + [
        (g, "simulated") for g in (4, 8, 16, 32, 64)
    ]
    by = {int(r["gpus"]): r for r in rows}
    assert float(by[2]["speedup"]) == pytest.approx(EPOCH_T1 / 6.5, rel=1e-5)
    assert float(by[2]["efficiency"]) == pytest.approx(EPOCH_T1 / 6.5 / 2, rel=1e-5)
    assert float(by[1]["speedup"]) == pytest.approx(1.0)
    for g, best in BEST.items():
        assert float(by[g]["best_dice"]) == pytest.approx(best)
        assert float(by[g]["dice_rel"]) == pytest.approx(best / BEST[1], rel=1e-5)
        assert int(by[g]["global_batch"]) == 2 * g
    # Simulated runs: no N-GPU time, speedup or efficiency; their wall time is kept apart.
    assert by[64]["time_per_epoch_s"] == by[64]["speedup"] == by[64]["efficiency"] == ""
    assert float(by[64]["wall_epoch_s"]) == 11.0
    # Target 0.95 * 0.80 = 0.76; Dice = best * (e+1)/6 reaches it at e = 5 for best 0.8, never for 0.72.
    assert rep.target == pytest.approx(0.76)
    assert by[1]["epochs_to_target"] == "6" and by[64]["epochs_to_target"] == ""
    md = (out / "scaling.md").read_text()
    assert "| 64 | simulated | sim_64 |" in md and "not reached" in md and "90.0%" in md
    printed = capsys.readouterr().out
    assert "| 2 | real | real_np2 |" in printed


def test_explicit_target_and_epochs(runs: Path, tmp_path: Path):
    rep = make_report([runs], tmp_path / "r", target_dice=0.4, echo=None)
    by = {r["gpus"]: r for r in rep.rows}
    # 0.8 * (e+1)/6 >= 0.4 first at e = 2 -> 3 epochs; 0.72 * (e+1)/6 >= 0.4 at e = 3 -> 4 epochs.
    assert by[1]["epochs_to_target"] == 3 and by[64]["epochs_to_target"] == 4


def test_report_with_predictions_and_calibration(runs: Path, tmp_path: Path):
    # Add a real 4-rank run so the CPU profile is fitted by least squares.
    make_run(runs, "real_np4", 4, epoch_time=3.6, comm=0.6, best=0.8)
    rep = make_report([runs], tmp_path / "p", predict=["study_p100_edr", "cpu_this_machine"], fit_ranks=None, echo=None)
    pred = [r for r in rep.rows if r["kind"] == "predicted"]
    assert sorted({r["source"] for r in pred}) == ["cpu_this_machine", "study_p100_edr"]
    assert len(pred) == 14
    for r in pred:
        assert 0 < r["efficiency"] <= 1.0 and r["speedup"] == pytest.approx(r["efficiency"] * r["gpus"])
    text = "\n".join(rep.assumptions)
    # These synthetic runs hold no wait for the slower rank, which the fit takes off: one term may clip to 0.
    assert "calibration of cpu_this_machine on all runs (least squares" in "\n".join(rep.model_check)
    assert "latency and bandwidth: least squares" in text and "(see the model check)" in text
    assert "intra_latency_us = " in text and "measured: fitted to the allreduce wait of real run(s)" in text
    assert "100 Gb/s EDR" in text and "scaled by relative throughput" in text
    md = (tmp_path / "p" / "scaling.md").read_text()
    assert "## Prediction assumptions" in md and "## Model check" in md
    rows = _csv(tmp_path / "p" / "scaling.csv")
    assert sum(r["kind"] == "predicted" for r in rows) == 14 and sum(r["kind"] == "real" for r in rows) == 3


def test_model_check_fits_one_rank_and_predicts_two_out_of_sample(runs: Path, tmp_path: Path, capsys):
    # A strong-scaling run: the 1-rank global batch of 2 on 2 ranks (1 per rank), 32 steps per epoch.
    make_run(runs, "real_np2_strong", 2, epoch_time=6.4, comm=0.2, batch=1)
    rep = make_report([runs], tmp_path / "m")
    # Fitted on real_np1: 64 samples / batch 2 = 32 steps of 12 s / 32 = 0.375 s compute (0.1875 s per sample).
    # Each 2-rank step adds the CPU profile's allreduce of 4e6 B (2 x 258 us + 4e6 / 4.1e9 s), half the 0.2 ms
    # cycle, and one small collective (hvdtrain's step flags: 2 x 258 us + 0.1 ms); each of the 2 ranks computes
    # x contention and x the wait for the slower rank (1 + cv x 0.564, one micro-batch a step): the profile's, both
    # measured by jobs.bench_contention, not fitted to these runs.
    comm = 2 * 258e-6 + 4e6 / 4.1e9 + 0.1e-3 + (2 * 258e-6 + 0.1e-3)
    cpu = PROFILES["cpu_this_machine"]
    c = cpu.contention * (1 + cpu.step_cv / math.sqrt(math.pi))
    weak = 16 * (0.375 * c + comm)  # 64 samples / global batch 4
    strong = 32 * (0.1875 * c + comm)  # 64 samples / global batch 2
    pts = {pt["label"]: pt for pt in rep.calibration.points}
    assert pts["real_np2"]["predicted_epoch_s"] == pytest.approx(weak, rel=1e-9)
    assert pts["real_np2_strong"]["predicted_epoch_s"] == pytest.approx(strong, rel=1e-9)
    err_weak, err_strong = 100 * (weak - 6.5) / 6.5, 100 * (strong - 6.4) / 6.4  # -7.1%, -3.5% without contention
    line = f"out-of-sample error (fit on 1 rank, predicting 2 ranks): {err_weak:+.1f}%, within the 15% target"
    strong_line = f"predicting 2 ranks, strong scaling): {err_strong:+.1f}%, within the 15% target"
    md = (tmp_path / "m" / "scaling.md").read_text()
    printed = capsys.readouterr().out
    for text in (md, printed):
        assert line in text and strong_line in text and "in-sample error (fit on 1 rank): +0.0%" in text
    assert f"**{line}**" in md  # in the summary lines under the table
    # Fitted on both rank counts there is nothing left to predict.
    rep2 = make_report([runs], tmp_path / "m2", fit_ranks=(1, 2), echo=None)
    assert "out-of-sample error: no real run outside the fitted ones (1, 2 ranks) to predict" in rep2.model_check


def test_predict_scaling_calibrates_from_runs(runs: Path, capsys):
    two = [str(runs / "real_np1"), str(runs / "real_np2")]
    argv = ["--profile", "cpu_this_machine", "--calibrate-from", *two, "--gpus", "1,2,4"]
    assert predict_scaling.main([*argv, "--fit-ranks", "1", "--global-batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "out-of-sample error (fit on 1 rank, predicting 2 ranks)" in out
    assert "source of compute: mean (epoch time - comm) / steps of real run(s) real_np1" in out
    assert "strong scaling (global batch 8 fixed):" in out
    assert predict_scaling.main([*argv, "--global-batch", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    weak = {r["gpus"]: r for r in rows if r["scaling"] == "weak"}
    strong = {r["gpus"]: r for r in rows if r["scaling"] == "strong"}
    # real_np1: 12 s per epoch of 32 steps of 2 = 0.375 s per step, taken as is on this machine (x contention and
    # the wait for the slowest of 4 ranks sharing the host, not on 1).
    cpu = PROFILES["cpu_this_machine"]
    c = cpu.compute_factor(4)
    # ... and each step waits for the slowest of the 4 ranks: cv x E[max of 4 normals] (1.0294) of the compute.
    wait = 0.375 * c * cpu.step_cv * 1.0294
    assert weak[4]["straggler_wait_s"] == pytest.approx(wait, rel=1e-4) and weak[1]["straggler_wait_s"] == 0.0
    assert weak[4]["compute_s"] == pytest.approx(0.375 * c) and weak[4]["global_batch"] == 8
    assert strong[4]["compute_s"] == pytest.approx(0.375 * c) and strong[1]["compute_s"] == pytest.approx(1.5)
    assert weak[1]["contention"] == 1.0 and weak[4]["contention"] == c
    # Fitted on both runs (the default: all), the 2-rank wait sets the latency and bandwidth.
    assert predict_scaling.main(argv) == 0
    out = capsys.readouterr().out
    assert "measured: fitted to the allreduce wait of real run(s) real_np2" in out
    # Another profile: the CPU compute is scaled by relative throughput (0.01 / 1 for a P100).
    assert predict_scaling.main(["--profile", "study_p100_edr", *argv[2:], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["compute_s"] == pytest.approx(0.375 * 0.01)
    assert predict_scaling.main([*argv, "--fit-ranks", "x"]) == 2
    assert predict_scaling.main(["--calibrate-from", str(runs / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_duplicate_runs_all_kept(runs: Path, tmp_path: Path):
    make_run(runs, "real_np1_b", 1, epoch_time=10.0, best=0.82)
    rep = make_report([runs], tmp_path / "d", echo=None)
    ones = [r for r in rep.rows if r["gpus"] == 1]
    assert len(ones) == 2
    assert rep.baseline_time == pytest.approx(11.0) and rep.baseline_dice == pytest.approx(0.81)
    assert (tmp_path / "d" / "time_speedup.png").read_bytes()[:8] == PNG


def test_missing_files_name_the_folder(runs: Path, tmp_path: Path, capsys):
    (runs / "sim_8" / "summary.json").unlink()
    with pytest.raises(RunFolderError, match=r"sim_8 has no summary\.json"):
        make_report([runs], tmp_path / "x", echo=None)
    (runs / "sim_16" / "metrics.jsonl").unlink()
    with pytest.raises(RunFolderError, match=r"sim_16 has no metrics\.jsonl"):
        load_run(runs / "sim_16")
    with pytest.raises(RunFolderError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    assert scaling_report.main([str(runs / "sim_8"), "--out", str(tmp_path / "x")]) == 2
    assert "sim_8 has no summary.json" in capsys.readouterr().err


def test_bad_content_errors(tmp_path: Path):
    d = make_run(tmp_path, "bad", 1)
    (d / "metrics.jsonl").write_text('{"epoch": 0, "split": "val", "dice": 0.5}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2"):
        load_run(d)
    d2 = make_run(tmp_path, "noval", 1)
    (d2 / "metrics.jsonl").write_text('{"epoch": 0, "split": "train", "time_s": 1}\n')
    with pytest.raises(ValueError, match="no validation values of 'dice'"):
        load_run(d2)
    d3 = make_run(tmp_path, "nows", 1)
    (d3 / "summary.json").write_text("{}")
    (d3 / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'world_size'"):
        load_run(d3)
    d4 = make_run(tmp_path, "nograd", 1, grad_bytes=None)
    with pytest.raises(ValueError, match="--grad-bytes"):
        make_report([d4], tmp_path / "o", predict=["study_p100_edr"], echo=None)
    with pytest.raises(ValueError, match="no run folders"):
        make_report([], tmp_path / "o", echo=None)


def test_cli_writes_report(runs: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    argv = [str(runs / n) for n in ("real_np1", "real_np2", "sim_64")]
    assert scaling_report.main([*argv, "--out", str(out), "--predict", "study_p100_edr", "--step-time", "0.3"]) == 0
    assert "study_p100_edr" in capsys.readouterr().out
    assert len(_csv(out / "scaling.csv")) == 3 + 7
    assert scaling_report.main([*argv, "--out", str(out), "--predict", "nope"]) == 2
    assert "unknown machine profile 'nope'" in capsys.readouterr().err
    assert scaling_report.main([*argv, "--out", str(out), "--fit-ranks", "all"]) == 0
    assert "in-sample error (fit on all runs)" in capsys.readouterr().out
    assert scaling_report.main([*argv, "--out", str(out), "--fit-ranks", "4"]) == 0  # the report still comes out
    assert "model check: no real run at the fit ranks [4]" in capsys.readouterr().out
    assert scaling_report.main([*argv, "--out", str(out), "--fit-ranks", "x"]) == 2
    assert "fit ranks must be" in capsys.readouterr().err


def test_grad_bytes_from_checkpoint_skips_batchnorm_buffers(tmp_path: Path):
    d = make_run(tmp_path, "ck", 1, grad_bytes=None)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4))
    (d / "checkpoints").mkdir()
    torch.save({"model": net.state_dict(), "epoch": 1}, d / "checkpoints" / "last.pt")
    n_params = sum(p.numel() for p in net.parameters())
    assert grad_bytes_from_checkpoint(load_run(d)) == 4 * n_params


STRONG_BEST = {1: 0.70, 2: 0.71, 16: 0.69, 64: 0.70}


def _add_strong(root: Path) -> None:
    """Strong-scaling runs of a global batch of 64 (2 per GPU at most): real 1 and 2 ranks, simulated 16 and 64."""
    # 128 samples: 2 steps per epoch at every count; 2 x 32 micro-batches on 1 rank, 2 x 16 on each of 2.
    kw = dict(global_batch=64, samples=128)
    make_run(root, "strong_np1", 1, epoch_time=12.0, best=STRONG_BEST[1], **kw)
    make_run(root, "strong_np2", 2, epoch_time=6.4, comm=0.4, best=STRONG_BEST[2], **kw)
    make_run(root, "strong_sim16", 1, simulate=16, epoch_time=13.0, best=STRONG_BEST[16], **kw)
    make_run(root, "strong_sim64", 1, simulate=64, epoch_time=14.0, best=STRONG_BEST[64], batch=1, **kw)


def test_report_weak_and_strong(runs: Path, tmp_path: Path, capsys):
    _add_strong(runs)
    out = tmp_path / "both"
    rep = make_report([runs], out, predict=["study_p100_edr"])
    rows = _csv(out / "scaling.csv")
    by = {(r["scaling"], r["kind"], int(r["gpus"])): r for r in rows}
    # Each mode against its own 1-GPU run: Dice and speedup.
    for g, best in STRONG_BEST.items():
        kind = "real" if g <= 2 else "simulated"
        assert float(by[("strong", kind, g)]["dice_rel"]) == pytest.approx(best / STRONG_BEST[1], rel=1e-5)
        assert int(by[("strong", kind, g)]["global_batch"]) == 64
    assert float(by[("weak", "simulated", 64)]["dice_rel"]) == pytest.approx(BEST[64] / BEST[1], rel=1e-5)
    assert float(by[("strong", "real", 2)]["speedup"]) == pytest.approx(12.0 / 6.4, rel=1e-5)
    assert rep.baseline_dice == pytest.approx(BEST[1])  # the first mode's (weak)
    # Predictions in both modes: the strong one keeps the global batch of 64 at every count.
    pred = [r for r in rep.rows if r["kind"] == "predicted"]
    assert {r["scaling"] for r in pred} == {"weak", "strong"} and len(pred) == 14
    assert {r["global_batch"] for r in pred if r["scaling"] == "strong"} == {64}
    weak_pred = {r["gpus"]: r["global_batch"] for r in pred if r["scaling"] == "weak"}
    assert weak_pred[64] == 2 * 64  # from the weak 1-GPU run's batch of 2, not the strong run's 2 x 32
    assert "strong scaling: global batch 64 at every GPU count" in "\n".join(rep.assumptions)
    # The model check: fitted on both 1-rank runs, each 2-rank run predicted out of sample under its own mode.
    held_out = {pt["label"]: pt["scaling"] for pt in rep.calibration.points if not pt["in_sample"]}
    assert held_out == {"real_np2": "weak", "strong_np2": "strong"}
    md = (out / "scaling.md").read_text()
    assert (
        "(fit on 1 rank, predicting 2 ranks): " in md and "(fit on 1 rank, predicting 2 ranks, strong scaling): " in md
    )
    assert "| 64 | simulated | strong_sim64 | strong | 64 |" in md and "| 64 | simulated | sim_64 | weak | 128 |" in md
    assert "3 weak scaling" not in md and "7 weak scaling, 4 strong scaling" in md
    assert "predicted efficiency at 64 GPUs on study_p100_edr, strong scaling: " in md
    for name in ("time_speedup.png", "dice_relative.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "| 2 | real | strong_np2 | strong |" in capsys.readouterr().out


def test_plot_series_per_mode_and_kind(runs: Path, tmp_path: Path):
    """The Dice plot draws one curve per (mode, kind), each marked as real, simulated or predicted."""
    from scaling import report

    _add_strong(runs)
    rep = make_report([runs], tmp_path / "s", predict=["study_p100_edr"], echo=None)
    rel = report._series(rep.rows, "dice_rel")
    assert set(rel) == {(k, k, m) for k in ("real", "simulated") for m in ("weak", "strong")}
    times = report._series(rep.rows, "time_per_epoch_s")
    assert ("predicted", "study_p100_edr", "strong") in times and ("real", "real", "strong") in times
    styles = {key: report._style(key[0], key[2], 0) for key in [*rel, *times]}
    assert styles[("real", "real", "weak")][0] == "o" and styles[("simulated", "simulated", "weak")][0] == "s"
    assert styles[("predicted", "study_p100_edr", "weak")][0] == "^"
    assert styles[("real", "real", "weak")][1] != styles[("real", "real", "strong")][1]  # colour = mode
    assert report._name("predicted", "study_p100_edr", "strong") == "strong: predicted, study_p100_edr"
