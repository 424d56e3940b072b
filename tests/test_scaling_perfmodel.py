"""The performance model: allreduce formulas against hand-computed numbers, efficiency properties, calibration."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from jobs import predict_scaling
from scaling import perfmodel as pm

# A small two-level machine with round numbers, for the hand computations below.
TOY = pm.MachineProfile(
    name="toy",
    gpu="toy",
    relative_throughput=1.0,
    gpus_per_node=4,
    intra_bw_gbs=10.0,
    intra_latency_us=5.0,
    nic_bw_gbs=10.0,
    nics_per_node=1,
    inter_latency_us=10.0,
    fusion_mb=128.0,
    cycle_ms=0.0,
    overlap=0.0,
)
# The CPU profile on a machine whose ranks neither slow nor wait for each other (the calibration tests' synthetic runs).
CPU_NO_CONTENTION = pm.derive(pm.PROFILES["cpu_this_machine"], "test: no contention", contention=1.0, step_cv=0.0)


def test_ring_allreduce_hand_computed():
    # 2 * 3/4 * 1e8 B / 1e10 B/s = 0.015 s; 2 * 3 * 10 us = 60 us
    assert pm.ring_allreduce_time(1e8, 4, 10.0, 10.0) == pytest.approx(0.01506, rel=1e-12)
    assert pm.ring_allreduce_time(1e8, 1, 10.0, 10.0) == 0.0
    assert pm.ring_allreduce_time(0, 2, 10.0, 7.0) == pytest.approx(14e-6)
    with pytest.raises(ValueError, match="ranks"):
        pm.ring_allreduce_time(1.0, 0, 1.0, 1.0)


def test_flat_and_hierarchical_hand_computed():
    # 8 GPUs = 2 nodes of 4. Flat: 2*7/8 * 1e8/1e10 + 14 * 10 us.
    flat, algo, calls = pm.allreduce_time(1e8, 8, TOY)
    assert (algo, calls) == ("flat ring", 1)
    assert flat == pytest.approx(0.0175 + 14e-5)
    # Hierarchical: 2 * (3/4 * 1e8/1e10 + 3 * 5 us) + (2 * 1/2 * 1e8/1e10 + 2 * 10 us).
    hier, algo, _ = pm.allreduce_time(1e8, 8, replace(TOY, hierarchical=True))
    assert algo == "hierarchical"
    assert hier == pytest.approx(2 * (0.0075 + 15e-6) + 0.01 + 20e-6)
    # Inside one node both are the plain ring.
    assert pm.allreduce_time(1e8, 4, TOY)[0] == pm.allreduce_time(1e8, 4, replace(TOY, hierarchical=True))[0]


def test_hierarchical_wins_with_fast_intra_node_links_and_on_latency():
    fast_node = replace(TOY, intra_bw_gbs=100.0)
    flat = pm.allreduce_time(1e8, 8, fast_node)[0]
    hier = pm.allreduce_time(1e8, 8, replace(fast_node, hierarchical=True))[0]
    assert hier == pytest.approx(2 * (0.00075 + 15e-6) + 0.01 + 20e-6)
    assert hier < flat
    # Small messages at 64 GPUs: 2(p-1) network steps against 2(m-1) + 2(g-1) fast ones.
    flat_small = pm.allreduce_time(1e3, 64, TOY)[0]
    hier_small = pm.allreduce_time(1e3, 64, replace(TOY, hierarchical=True))[0]
    assert hier_small < flat_small / 3


def test_network_bandwidth_per_node_counts_adapters():
    eight = replace(TOY, gpus_per_node=8, nics_per_node=8, nic_bw_gbs=45.0)
    assert eight.node_bw_gbs == 360.0
    assert replace(TOY, nics_per_node=8).node_bw_gbs == 40.0  # no more adapters used than GPUs in the node


def test_tensor_fusion_pays_latency_per_buffer():
    prof = replace(TOY, fusion_mb=64.0)
    nbytes = 200 * pm.MB  # 64 + 64 + 64 + 8 MiB
    t, _, calls = pm.allreduce_time(nbytes, 2, prof)
    assert calls == 4
    assert t == pytest.approx(pm.ring_allreduce_time(nbytes, 2, 10.0, 5.0) + 3 * 2 * 5e-6)
    with pytest.raises(ValueError, match="n_tensors"):
        pm.allreduce_time(nbytes, 2, replace(TOY, fusion_mb=0.0))
    assert pm.allreduce_time(nbytes, 2, replace(TOY, fusion_mb=0.0), n_tensors=10)[2] == 10


def test_overlap_hides_at_most_the_backward_pass():
    prof = replace(TOY, overlap=0.5, cycle_ms=2.0)
    comm = pm.allreduce_time(1e8, 2, prof)[0]
    long = pm.predict_point(prof, 3.0, 1e8, 100, 1, 2)
    assert long["exposed_comm_s"] == pytest.approx(0.5 * comm + 1e-3)  # half hidden, plus half a cycle
    short = pm.predict_point(prof, 3e-3, 1e8, 100, 1, 2)  # backward (2 ms) hides less than half the comm
    assert short["exposed_comm_s"] == pytest.approx(comm - 2e-3 + 1e-3)
    assert pm.predict_point(prof, 3.0, 1e8, 100, 1, 1)["exposed_comm_s"] == 0.0


@pytest.mark.parametrize("name", sorted(pm.PROFILES))
def test_efficiency_is_one_at_one_gpu_at_most_one_and_monotone(name):
    for grad in (0.0, 1e3, 1e6, 3e8, 2e9):
        for compute in (1e-3, 0.1, 2.0):
            rows = pm.predict_table(name, compute, grad, 10_000, 2, gpus=range(1, 65))
            eff = [r["efficiency"] for r in rows]
            assert eff[0] == pytest.approx(1.0)
            assert all(e <= 1.0 + 1e-12 for e in eff)
            assert all(b <= a + 1e-12 for a, b in zip(eff, eff[1:])), (name, grad, compute)


def test_predict_table_numbers():
    rows = pm.predict_table(TOY, 0.5, 1e8, 1024, 4, gpus=[1, 2, 8])
    one, two, eight = rows
    assert [r["global_batch"] for r in rows] == [4, 8, 32]
    assert one["epoch_s"] == pytest.approx(1024 / 4 * 0.5)
    assert two["step_s"] == pytest.approx(0.5 + pm.ring_allreduce_time(1e8, 2, 10.0, 5.0))
    for r in rows:
        assert r["speedup"] == pytest.approx(one["epoch_s"] / r["epoch_s"])
        assert r["efficiency"] == pytest.approx(one["step_s"] / r["step_s"])
    assert eight["nodes"] == 2 and eight["algorithm"] == "flat ring"


def test_compute_scaled_by_relative_throughput():
    assert pm.compute_on(pm.PROFILES["study_p100_edr"], 1.0, "modern_h100_ndr") == pytest.approx(10.0)
    assert pm.compute_on(pm.PROFILES["study_p100_edr"], 1.0) == 1.0
    rows = pm.predict_table("modern_h100_ndr", 2.0, 1e6, 100, 1, gpus=[1], measured_on="cpu_this_machine")
    assert rows[0]["compute_s"] == pytest.approx(2.0 * 0.01 / 10.0)


def _measurements(lat_us: float, bw_gbs: float, worlds, grad=4e6, steps=50, compute=0.2, cycle_ms=0.2):
    out = []
    for p in worlds:
        comm_step = 0.0 if p == 1 else 2 * (p - 1) * lat_us * 1e-6 + 2 * (p - 1) / p * grad / (bw_gbs * 1e9)
        comm_step += cycle_ms * 1e-3 / 2 if p > 1 else 0.0
        out.append(pm.Measurement(p, steps, steps * (compute + comm_step), steps * comm_step, grad, f"np{p}"))
    return out


def _run(p: int, batch: int, lat_us: float, bw_gbs: float, small: int = 0, per_sample=0.01, grad=4e6, samples=400):
    """A real run on a known machine (cycle 0.2 ms as the CPU profile): compute = per_sample x per-rank batch."""
    tail = 0.1e-3 if p > 1 else 0.0  # half the 0.2 ms cycle
    comm = (2 * (p - 1) * lat_us * 1e-6 + 2 * (p - 1) / p * grad / (bw_gbs * 1e9) + tail) if p > 1 else 0.0
    small_s = small * (2 * (p - 1) * lat_us * 1e-6 + tail) if p > 1 else 0.0  # inside the compute the loop measures
    steps = samples / (batch * p)
    epoch = steps * (per_sample * batch + small_s + comm)
    return pm.Measurement(p, steps, epoch, steps * comm, grad, f"np{p}-b{batch}", batch, small)


def test_calibration_recovers_latency_and_bandwidth():
    cal = pm.calibrate(CPU_NO_CONTENTION, _measurements(80.0, 1.5, [1, 2, 3, 4]))
    assert cal.method == "least squares"
    assert cal.profile.intra_latency_us == pytest.approx(80.0, rel=1e-6)
    assert cal.profile.intra_bw_gbs == pytest.approx(1.5, rel=1e-6)
    assert cal.compute_step_s == pytest.approx(0.2)
    assert all(abs(pt["error_pct"]) < 1e-6 for pt in cal.points)
    assert any("error" in line for line in cal.lines())
    # The calibrated profile then predicts an unseen world size exactly.
    six = _measurements(80.0, 1.5, [6])[0]
    pred = pm.predict_point(cal.profile, 0.2, six.grad_bytes, 50, 1, 6)
    assert pred["step_s"] * 50 == pytest.approx(six.epoch_time_s, rel=1e-9)


def test_calibration_with_one_world_size_uses_a_ratio_and_fits_that_point():
    cal = pm.calibrate(CPU_NO_CONTENTION, _measurements(300.0, 0.5, [1, 2]))
    assert cal.method.startswith("ratio")
    two = next(pt for pt in cal.points if pt["world_size"] == 2)
    assert two["error_pct"] == pytest.approx(0.0, abs=1e-9)
    assert pm.calibrate(CPU_NO_CONTENTION, _measurements(1, 1, [1])).method.startswith("no multi-rank run fitted")
    with pytest.raises(ValueError, match="at least one"):
        pm.calibrate(CPU_NO_CONTENTION, [])
    with pytest.raises(ValueError, match="per node"):
        pm.calibrate("study_p100_edr", _measurements(10, 10, [8]))


@pytest.mark.parametrize("name", sorted(pm.PROFILES))
def test_every_number_of_every_profile_has_a_source(name):
    prof = pm.PROFILES[name]
    assert set(pm.SOURCED_FIELDS) >= {"relative_throughput", "gpus_per_node", "intra_bw_gbs", "inter_latency_us"}
    assert pm.missing_sources(prof) == []
    for field_name in pm.SOURCED_FIELDS:
        assert len(prof.sources[field_name].strip()) > 10, field_name
    text = "\n".join(pm.source_lines(prof))
    assert "NO SOURCE GIVEN" not in text and f"gpus_per_node = {prof.gpus_per_node}:" in text


def test_cpu_profile_numbers_are_the_measured_allreduce():
    cpu = pm.PROFILES["cpu_this_machine"]
    for field_name in ("intra_bw_gbs", "intra_latency_us"):
        assert cpu.sources[field_name].startswith("measured: `python -m jobs.bench_allreduce --repeats 2`")
    # bench_allreduce's 2-rank figures come back: 1 KiB in 615 us (with the cycle tail), 16 and 64 MiB within 3%.
    tiny = pm.predict_point(replace(cpu, step_cv=0.0), 1.0, 1024, 1, 1, 2)  # the allreduce alone: no straggler
    assert tiny["exposed_comm_s"] == pytest.approx(615e-6, rel=0.01)
    for mib, busbw in ((16, 3.722), (64, 3.997)):
        t = pm.allreduce_time(mib * pm.MB, 2, cpu)[0]
        assert mib * pm.MB / t / 1e9 == pytest.approx(busbw, rel=0.03)  # bus bandwidth at 2 ranks = n / t
    assert pm.PROFILES["modern_h100_ndr"].sources["gpus_per_node"].startswith("NVIDIA DGX H100 user guide")


def test_sources_follow_changes():
    base = pm.PROFILES["study_p100_edr"]
    changed = pm.derive(base, "measured: a test", nic_bw_gbs=5.0, name="x")
    assert changed.sources["nic_bw_gbs"] == "measured: a test" and changed.nic_bw_gbs == 5.0
    assert changed.sources["gpus_per_node"] == base.sources["gpus_per_node"]
    assert base.sources["nic_bw_gbs"] != "measured: a test"  # the named profile is untouched
    with pytest.raises(ValueError, match=r"sources name fields.*\['gpu'\]"):
        replace(base, sources={"gpu": "datasheet"})
    assert pm.missing_sources(TOY) == list(pm.SOURCED_FIELDS)


def test_fit_on_one_rank_predicts_two_ranks_out_of_sample_hand_computed():
    # True machine: 300 us per ring step, 2 GB/s, 10 ms of compute per sample, 3 small collectives per step.
    runs = [_run(1, 2, 300.0, 2.0, 3), _run(2, 2, 300.0, 2.0, 3), _run(2, 1, 300.0, 2.0, 3)]
    cal = pm.calibrate(CPU_NO_CONTENTION, runs, fit_ranks=(1,))
    # Nothing multi-rank is fitted: the profile keeps bench_allreduce's 258 us and 4.1 GB/s.
    assert cal.method.startswith("no multi-rank run fitted") and cal.fit_ranks == (1,)
    assert cal.profile.intra_latency_us == 258.0 and cal.profile.intra_bw_gbs == 4.1
    assert cal.compute_step_s == pytest.approx(0.02) and cal.compute_per_sample_s == pytest.approx(0.01)
    one, weak, strong = cal.points
    assert (one["in_sample"], weak["in_sample"], strong["in_sample"]) == (True, False, False)
    assert (one["scaling"], weak["scaling"], strong["scaling"]) == ("fit", "weak", "strong")
    assert one["error_pct"] == pytest.approx(0.0, abs=1e-9)
    # Per step at 2 ranks. Measured: compute + 3 x (2 x 300 us + 0.1 ms) + 2 x 300 us + 4e6 B / 2 GB/s + 0.1 ms.
    # Predicted: compute + 3 x (2 x 258 us + 0.1 ms) + 2 x 258 us + 4e6 B / 4.1 GB/s + 0.1 ms.
    for pt, compute in ((weak, 0.02), (strong, 0.01)):
        measured = compute + 3 * 0.7e-3 + 0.6e-3 + 2e-3 + 0.1e-3
        predicted = compute + 3 * 0.616e-3 + 0.516e-3 + 4e6 / 4.1e9 + 0.1e-3
        assert pt["error_pct"] == pytest.approx(100 * (predicted - measured) / measured, rel=1e-9)
    assert weak["error_pct"] == pytest.approx(-5.486, abs=1e-3) and strong["error_pct"] == pytest.approx(
        -9.192, abs=1e-3
    )
    summaries = cal.summaries()
    assert [(s["in_sample"], s["scaling"], s["ranks"]) for s in summaries] == [
        (True, "fit", [1]),
        (False, "strong", [2]),
        (False, "weak", [2]),
    ]
    lines = cal.summary_lines()
    assert "in-sample error (fit on 1 rank): +0.0%" in lines
    assert "out-of-sample error (fit on 1 rank, predicting 2 ranks): -5.5%, within the 15% target" in lines
    assert (
        "out-of-sample error (fit on 1 rank, predicting 2 ranks, strong scaling): -9.2%, within the 15% target" in lines
    )
    assert any("np2-b1 (2 rank(s), held out, strong scaling)" in line for line in cal.lines())


def test_out_of_sample_error_outside_the_target_and_fit_choices():
    slow = [_run(1, 2, 3000.0, 0.5), _run(2, 2, 3000.0, 0.5), _run(2, 2, 3000.0, 0.5)]
    cal = pm.calibrate(CPU_NO_CONTENTION, slow, fit_ranks=[1])
    out = [s for s in cal.summaries() if not s["in_sample"]]
    assert len(out) == 1 and out[0]["runs"] == 2 and not out[0]["within_target"]
    assert any(
        line.endswith("NOT within the 15% target") and "(largest of 2 runs)" in line for line in cal.summary_lines()
    )
    # Fitted on every run, the 2-rank runs are in sample: the ratio fit then matches them exactly.
    every = pm.calibrate(CPU_NO_CONTENTION, slow)
    assert every.fit_ranks is None and all(pt["in_sample"] for pt in every.points)
    assert "out-of-sample error: no real run outside the fitted ones (all runs) to predict" in every.summary_lines()
    assert all(abs(pt["error_pct"]) < 1e-6 for pt in every.points)
    with pytest.raises(ValueError, match=r"no real run at the fit ranks \[4\] \(runs at \[1, 2\] ranks\)"):
        pm.calibrate(CPU_NO_CONTENTION, slow, fit_ranks=(4,))
    assert pm.parse_ranks("1") == (1,) and pm.parse_ranks("1, 2") == (1, 2) and pm.parse_ranks("all") is None
    for bad in ("", "0", "one"):
        with pytest.raises(ValueError, match="fit ranks"):
            pm.parse_ranks(bad)


def test_small_collectives_cost_latency_and_half_a_cycle_each():
    cpu = pm.PROFILES["cpu_this_machine"]
    assert pm.small_allreduce_time(cpu, 1, 5) == 0.0
    assert pm.small_allreduce_time(cpu, 2, 3) == pytest.approx(3 * (2 * 258e-6 + 0.1e-3))
    with_small = pm.predict_point(cpu, 0.01, 4e6, 100, 2, 2, small_allreduces=3)
    without = pm.predict_point(cpu, 0.01, 4e6, 100, 2, 2)
    assert with_small["step_s"] - without["step_s"] == pytest.approx(with_small["small_allreduce_s"])


def test_strong_split_per_gpu_batch_and_accumulation():
    assert pm.strong_split(64, 8) == (8, 8, 1)
    assert pm.strong_split(64, 1, 16) == (64, 16, 4)
    assert pm.strong_split(64, 4, 5) == (16, 5, 4)  # 5 + 5 + 5 + 1
    assert pm.strong_split(14, 2, 4) == (7, 4, 2)  # 4 + 3
    assert pm.strong_split(64, 64, 4) == (1, 1, 1)
    with pytest.raises(ValueError, match="global batch 10 does not split evenly over 4 GPUs"):
        pm.strong_split(10, 4)
    with pytest.raises(ValueError, match=">= 1"):
        pm.strong_split(8, 2, 0)


def test_strong_scaling_compute_shrinks_as_1_over_n_and_comm_does_not():
    # TOY: no cycle, no overlap. Global batch 64, 10 ms per sample, 1e8 B of gradients, 1024 samples = 16 steps.
    rows = pm.predict_strong_table(TOY, 0.01, 1e8, 1024, 64, gpus=[1, 2, 4, 8])
    assert [r["scaling"] for r in rows] == ["strong"] * 4
    assert [(r["batch_per_gpu"], r["micro_batch"], r["accum"]) for r in rows] == [
        (64, 64, 1),
        (32, 32, 1),
        (16, 16, 1),
        (8, 8, 1),
    ]
    assert [r["global_batch"] for r in rows] == [64] * 4
    assert [r["steps_per_epoch"] for r in rows] == pytest.approx([16] * 4)
    assert [r["compute_s"] for r in rows] == pytest.approx([0.64, 0.32, 0.16, 0.08])
    # The allreduce of the same 1e8 B grows with N: 2(p-1)/p x 1e8 / 1e10 + 2(p-1) x latency (8 GPUs: 2 nodes, flat).
    comm = [0.0, 0.01 + 2 * 5e-6, 0.015 + 6 * 5e-6, 0.0175 + 14 * 10e-6]
    assert [r["allreduce_s"] for r in rows] == pytest.approx(comm)
    epochs = [16 * (c + a) for c, a in zip([0.64, 0.32, 0.16, 0.08], comm)]
    assert [r["epoch_s"] for r in rows] == pytest.approx(epochs)
    assert [r["speedup"] for r in rows] == pytest.approx([10.24 / e for e in epochs])
    assert rows[3]["efficiency"] == pytest.approx(10.24 / epochs[3] / 8)  # 10.24 / 1.56224 / 8 = 81.9%
    assert rows[3]["efficiency"] == pytest.approx(0.8193, abs=1e-4)
    # Weak scaling on the same numbers keeps the per-GPU compute and so does better.
    weak = pm.predict_table(TOY, 0.64, 1e8, 1024, 64, gpus=[8])[0]
    assert weak["efficiency"] > rows[3]["efficiency"] and weak["scaling"] == "weak"


def test_strong_scaling_with_a_memory_cap_accumulates():
    # 64 per step on 1 GPU in 4 micro-batches of 16; on 2 GPUs 32 each in 2 of 16. Compute stays linear in samples.
    rows = pm.predict_strong_table(TOY, 0.01, 0.0, 640, 64, gpus=[1, 2, 4], max_batch_per_gpu=16)
    assert [(r["batch_per_gpu"], r["micro_batch"], r["accum"]) for r in rows] == [(64, 16, 4), (32, 16, 2), (16, 16, 1)]
    assert [r["compute_s"] for r in rows] == pytest.approx([0.64, 0.32, 0.16])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 1.0, 1.0])  # nothing to allreduce
    # Overlap hides comm behind the last micro-batch's backward only: accumulation leaves less to hide behind.
    prof = replace(TOY, overlap=1.0)
    capped = pm.predict_strong_table(prof, 0.01, 1e9, 640, 64, gpus=[2], max_batch_per_gpu=4)[0]
    whole = pm.predict_strong_table(prof, 0.01, 1e9, 640, 64, gpus=[2])[0]
    assert capped["accum"] == 8 and whole["accum"] == 1
    # 0.32 s of compute; the allreduce, 1e9 / 1e10 s + 8 fusion buffers x 2 x 5 us, hides behind 2/3 of it, or
    # behind 2/3 of the last of 8 micro-batches.
    assert whole["exposed_comm_s"] == pytest.approx(0.0)
    assert capped["exposed_comm_s"] == pytest.approx(0.1 + 8e-5 - 2 / 3 * 0.32 / 8)
    with pytest.raises(ValueError, match="does not split evenly over 3 GPUs"):
        pm.predict_strong_table(TOY, 0.01, 0.0, 640, 64, gpus=[3])
    table = pm.format_prediction(rows)
    assert "| per-GPU batch | micro x accum |" in table and "| 64 | 16 x 4 |" in table


def test_profiles_by_name_and_from_files(tmp_path):
    assert pm.get_profile("study_p100_edr").gpus_per_node == 4
    with pytest.raises(KeyError, match="unknown machine profile"):
        pm.get_profile("nope")
    y = tmp_path / "mine.yaml"
    y.write_text("base: modern_h100_ndr\nnic_bw_gbs: 22.5\nnics_per_node: 4\n")
    prof = pm.get_profile(y)
    assert (prof.name, prof.nic_bw_gbs, prof.gpus_per_node) == ("mine", 22.5, 8)
    assert prof.sources["nic_bw_gbs"] == f"given in {y}"
    assert prof.sources["gpus_per_node"] == pm.PROFILES["modern_h100_ndr"].sources["gpus_per_node"]
    cited = tmp_path / "cited.yaml"
    cited.write_text("base: modern_h100_ndr\noverlap: 0.9\nsources:\n  overlap: 'measured: a timeline'\n")
    assert pm.get_profile(cited).sources["overlap"] == "measured: a timeline"
    j = tmp_path / "full.json"
    j.write_text(json.dumps({**pm.profile_dict(pm.PROFILES["study_p100_edr"]), "name": "j"}))
    assert pm.get_profile(j).name == "j"
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: study_p100_edr\nbandwidth: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*unknown keys \['bandwidth'\]"):
        pm.get_profile(bad)
    neg = tmp_path / "neg.yaml"
    neg.write_text("base: study_p100_edr\noverlap: 1.5\n")
    with pytest.raises(ValueError, match="neg.yaml.*overlap"):
        pm.get_profile(neg)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        pm.get_profile(tmp_path / "missing.yaml")


def test_predict_cli_prints_assumptions_and_64_gpu_efficiency(capsys):
    args = [
        "--profile",
        "study_p100_edr",
        "--step-time",
        "0.5",
        "--grad-bytes",
        "7.6e7",
        "--samples",
        "800",
        "--batch",
        "2",
    ]
    assert predict_scaling.main(args) == 0
    out = capsys.readouterr().out
    assert "100 Gb/s EDR" in out and "fusion buffer 64 MiB" in out
    assert "sources:" in out and "cycle_ms = 5: Horovod operations.cc before 0.20" in out
    assert predict_scaling.main([*args, "--overlap", "0.2"]) == 0
    assert "overlap = 0.2: command line: --overlap 0.2" in capsys.readouterr().out
    assert "predicted efficiency at 64 GPUs on study_p100_edr" in out
    assert predict_scaling.main([*args, "--json", "--overlap", "0", "--gpus", "1,64"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["gpus"] for r in rows] == [1, 64] and rows[1]["efficiency"] < 1
    assert predict_scaling.main([*args, "--overlap", "2"]) == 2
    assert "overlap" in capsys.readouterr().err
    assert predict_scaling.main(["--profile", "nope", *args[2:]]) == 2
    assert math.isfinite(rows[1]["epoch_s"])
    assert predict_scaling.main(args[:4]) == 2
    assert "pass --grad-bytes, --samples, --batch (or --calibrate-from RUN_DIR..." in capsys.readouterr().err


def test_predict_cli_strong_scaling_beside_weak(capsys):
    args = ["--profile", "study_p100_edr", "--step-time", "0.5", "--grad-bytes", "7.6e7", "--samples", "800"]
    args += ["--batch", "2", "--gpus", "1,2,4,8,16"]
    assert predict_scaling.main([*args, "--global-batch", "16", "--max-batch-per-gpu", "4"]) == 0
    out = capsys.readouterr().out
    assert "weak scaling (per-GPU batch fixed):" in out and "strong scaling (global batch 16 fixed):" in out
    assert "micro-batches of at most 4, the rest by gradient accumulation" in out
    assert "predicted efficiency at 16 GPUs on study_p100_edr:" in out and "(strong, global batch 16)" in out
    assert predict_scaling.main([*args, "--global-batch", "16", "--max-batch-per-gpu", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    strong = [r for r in rows if r["scaling"] == "strong"]
    assert [r["gpus"] for r in strong] == [1, 2, 4, 8, 16]
    assert [(r["batch_per_gpu"], r["micro_batch"], r["accum"]) for r in strong] == [
        (16, 4, 4),
        (8, 4, 2),
        (4, 4, 1),
        (2, 2, 1),
        (1, 1, 1),
    ]
    # 0.5 s per step of 2 samples: 0.25 s per sample, times 16 / N.
    assert [r["compute_s"] for r in strong] == pytest.approx([4.0, 2.0, 1.0, 0.5, 0.25])
    assert all(r["steps_per_epoch"] == pytest.approx(50) for r in strong)
    assert predict_scaling.main([*args, "--global-batch", "12"]) == 2
    assert "global batch 12 does not split evenly over 8 GPUs" in capsys.readouterr().err


# ---------------------------------------------------------------- contention of ranks sharing a node


def test_contention_multiplies_compute_only_with_more_than_one_rank_per_node():
    prof = replace(TOY, contention=1.25)
    one = pm.predict_point(prof, 0.2, 1e8, 100, 2, 1)
    assert (one["compute_s"], one["contention"], one["step_s"]) == (0.2, 1.0, 0.2)  # 1 rank: as measured
    two = pm.predict_point(prof, 0.2, 1e8, 100, 2, 2)
    assert two["contention"] == 1.25 and two["compute_s"] == pytest.approx(0.25)
    # 0.25 s of compute + the ring of 1e8 B over 2 GPUs (1e8 / 1e10 s + 2 x 5 us); no cycle, no overlap in TOY.
    assert two["step_s"] == pytest.approx(0.25 + 0.01 + 10e-6)
    assert two["step_s"] - pm.predict_point(TOY, 0.2, 1e8, 100, 2, 2)["step_s"] == pytest.approx(0.05)
    # One GPU per node: no rank shares a node, so no contention even on 8 GPUs.
    alone = replace(prof, gpus_per_node=1)
    assert pm.predict_point(alone, 0.2, 1e8, 100, 2, 8)["compute_s"] == 0.2
    assert prof.compute_factor(1) == 1.0 and prof.compute_factor(64) == 1.25 and alone.compute_factor(8) == 1.0
    # The weak-scaling table: speedup against 1 GPU shrinks by the factor when comm is free.
    free = pm.predict_table(prof, 0.2, 0.0, 100, 2, gpus=[1, 2, 4])
    assert [r["speedup"] for r in free] == pytest.approx([1.0, 2 / 1.25, 4 / 1.25])
    with pytest.raises(ValueError, match="contention must be > 0"):
        replace(TOY, contention=0.0)


def test_contention_is_in_the_out_of_sample_prediction_and_never_fitted():
    # True machine: 300 us per ring step, 2 GB/s, 10 ms per sample alone, x1.2 with 2 ranks on the host.
    c = 1.2
    np1 = _run(1, 2, 300.0, 2.0)
    np2 = _run(2, 2, 300.0, 2.0)
    slowed = replace(np2, epoch_time_s=np2.epoch_time_s + np2.steps_per_epoch * 0.02 * (c - 1))
    # The profile's latency and bandwidth match the machine, so only the compute can be wrong.
    exact = pm.derive(CPU_NO_CONTENTION, "test", intra_latency_us=300.0, intra_bw_gbs=2.0, inter_latency_us=300.0)
    without = pm.calibrate(exact, [np1, slowed], fit_ranks=(1,))
    with_c = pm.calibrate(pm.derive(exact, "measured: a probe", contention=c), [np1, slowed], fit_ranks=(1,))
    assert without.points[1]["error_pct"] < -5  # too fast: two ranks computing as fast as one alone
    assert with_c.points[1]["error_pct"] == pytest.approx(0.0, abs=1e-9)
    assert with_c.profile.contention == c  # calibration keeps the probe's factor: it is not fitted to the runs
    assert any("contention x1.2" in line and "not fitted: measured: a probe" in line for line in with_c.lines())
    # Fitted on the 2-rank run itself, the compute is one GPU's alone: the contention is taken out.
    own = pm.calibrate(pm.derive(exact, "measured: a probe", contention=c), [np1, slowed], fit_ranks=(2,))
    assert own.compute_step_s == pytest.approx(0.02) and own.points[0]["error_pct"] == pytest.approx(0.0, abs=1e-9)


def test_contention_sources():
    cpu = pm.PROFILES["cpu_this_machine"]
    assert cpu.contention == pm.CPU_CONTENTION and cpu.contention > 1
    assert cpu.sources["contention"].startswith("measured: `python -m jobs.bench_contention")
    assert cpu.step_cv == pm.CPU_STEP_CV > 0 and "not the 2-rank runs it predicts" in cpu.sources["step_cv"]
    assert "not the 2-rank runs it predicts" in cpu.sources["contention"]
    for name in ("study_p100_edr", "modern_h100_ndr"):
        gpu = pm.PROFILES[name]
        assert gpu.contention == 1.0 and gpu.sources["contention"].startswith("assumption: 1, no contention")
    text = "\n".join(pm.assumption_lines(cpu))
    assert f"x{cpu.contention:.3g} compute time per rank when more than one rank shares a node" in text
    assert f"contention = {cpu.contention:g}: measured: `python -m jobs.bench_contention" in text
    assert f"step_cv = {cpu.step_cv:g}: measured: `python -m jobs.bench_contention" in text


def test_predict_cli_contention_override(capsys):
    args = ["--profile", "study_p100_edr", "--step-time", "0.5", "--grad-bytes", "0", "--samples", "800"]
    args += ["--batch", "2", "--gpus", "1,2", "--json"]
    assert predict_scaling.main([*args, "--contention", "1.5"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["compute_s"] for r in rows] == pytest.approx([0.5, 0.75])
    assert predict_scaling.main([*args[:-1], "--contention", "1.5"]) == 0
    assert "contention = 1.5: command line: --contention 1.5" in capsys.readouterr().out


def test_contention_probe_pieces():
    from jobs import bench_contention

    assert bench_contention.contention_factor([1.0, 2.0, 3.0], [[2.4, 2.6], [2.0, 3.0]]) == pytest.approx(2.5 / 2.0)
    with pytest.raises(ValueError, match="at least one"):
        bench_contention.contention_factor([], [[1.0]])
    # Coefficients of variation 0.1 (steps 0.9, 1.1), 0 and 0.5 (1, 3): the median process's.
    assert bench_contention.spread([[0.9, 1.1], [2.0, 2.0], [1.0, 3.0]]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="two step times"):
        bench_contention.spread([[1.0]])
    import torch

    threads = torch.get_num_threads()
    try:
        times = bench_contention.step_times(bench_contention.CONFIG, 2)  # two steps of the bench_scaling recipe
        assert len(times) == 2 and all(0 < t < 10 for t in times)
    finally:
        torch.set_num_threads(threads)  # step_times sets the preset's threads for its (worker) process


def test_expected_max_of_normals_and_the_straggler_wait():
    assert pm.expected_max_normal(1) == pytest.approx(0.0, abs=1e-9)
    assert pm.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-6)
    assert pm.expected_max_normal(4) == pytest.approx(1.029375, rel=1e-5)  # the tabulated value
    assert pm.expected_max_normal(64) == pytest.approx(2.3433, abs=2e-3)  # 200 000 Monte Carlo draws: 2.3433
    with pytest.raises(ValueError, match=">= 1"):
        pm.expected_max_normal(0)
    # cv 0.2: one micro-batch a step on 2 ranks waits 0.2 / sqrt(pi); 16 accumulated ones a quarter of that.
    assert pm.straggler_factor(2, 1, 0.2) == pytest.approx(1 + 0.2 / math.sqrt(math.pi))
    assert pm.straggler_factor(2, 16, 0.2) - 1 == pytest.approx((pm.straggler_factor(2, 1, 0.2) - 1) / 4)
    assert pm.straggler_factor(1, 1, 0.2) == 1.0 and pm.straggler_factor(8, 1, 0.0) == 1.0
    prof = replace(TOY, contention=1.25, step_cv=0.2)
    assert prof.compute_factor(1) == 1.0 and prof.compute_factor(2) == 1.25  # the wait is no compute
    assert prof.straggler_wait(0.4, 2, 4) == pytest.approx(0.4 * 0.1 / math.sqrt(math.pi))
    # In a prediction the wait joins the exposed communication (where hvdtrain times it), less with accumulation.
    one, acc = pm.predict_point(prof, 0.2, 0.0, 100, 2, 2), pm.predict_point(prof, 0.2, 0.0, 100, 2, 2, accum=4)
    wait = 0.25 * 0.2 / math.sqrt(math.pi)
    assert one["compute_s"] == pytest.approx(0.25) and one["straggler_wait_s"] == pytest.approx(wait)
    assert one["exposed_comm_s"] == pytest.approx(wait) and one["step_s"] == pytest.approx(0.25 + wait)
    assert acc["straggler_wait_s"] == pytest.approx(wait / 2)
    assert pm.predict_point(prof, 0.2, 0.0, 100, 2, 1)["straggler_wait_s"] == 0.0
    # One GPU per node: no contention, but the ranks still wait for each other.
    assert replace(prof, gpus_per_node=1).compute_factor(2) == 1.0
    assert pm.predict_point(replace(prof, gpus_per_node=1), 0.2, 0.0, 100, 2, 2)["straggler_wait_s"] > 0
    with pytest.raises(ValueError, match="step_cv must be >= 0"):
        replace(TOY, step_cv=-0.1)


def test_per_update_compute_and_stragglers_predict_weak_and_strong_out_of_sample():
    """Two 1-rank runs of 1 and 32 micro-batches a step separate per-sample and per-update compute; with the
    profile's straggler spread the 2-rank weak (1 micro-batch) and strong (16) runs are predicted exactly."""
    prof = pm.derive(CPU_NO_CONTENTION, "test", intra_latency_us=300.0, intra_bw_gbs=2.0, inter_latency_us=300.0)
    prof = pm.derive(prof, "test: a probe", step_cv=0.15)
    per_sample, per_update, grad, samples = 0.012, 0.003, 1e5, 960.0

    def run(p: int, accum: int) -> pm.Measurement:
        """As hvdtrain measures it: the wait for the slower rank lands in the allreduce wait (comm), not compute."""
        compute = per_sample * 2 * accum + per_update
        wait = compute * (pm.straggler_factor(p, accum, 0.15) - 1)
        comm = pm.allreduce_time(grad, p, prof)[0] + (0.1e-3 if p > 1 else 0.0) + wait
        small = pm.small_allreduce_time(prof, p, 1.0)  # the loop's step flags: inside the compute it measures
        steps = samples / (2 * accum * p)
        epoch = steps * (compute + small + comm)
        return pm.Measurement(p, steps, epoch, steps * comm, grad, f"np{p}-a{accum}", 2 * accum, 1.0, accum)

    runs = [run(1, 32), run(1, 1), run(2, 16), run(2, 1)]
    cal = pm.calibrate(prof, runs, fit_ranks=(1,))
    assert cal.compute_per_sample_s == pytest.approx(per_sample) and cal.compute_per_update_s == pytest.approx(
        per_update
    )
    assert all(pt["error_pct"] == pytest.approx(0.0, abs=1e-6) for pt in cal.points)
    assert all(pt["predicted_comm_step_s"] == pytest.approx(pt["measured_comm_step_s"]) for pt in cal.points)
    assert [pt["scaling"] for pt in cal.points] == ["fit", "fit", "strong", "weak"]
    assert any("+ 0.003 s per update" in line for line in cal.lines())
    assert any(line.startswith("  stragglers: micro-batch time spread (cv) 0.15") for line in cal.lines())
    # Fitted on every run, latency and bandwidth come from the allreduce wait less the modelled straggler wait:
    # the two 2-rank runs (waits of 23 and 5 ms a step) then fit exactly, and compute is not deflated.
    every = pm.calibrate(prof, runs, fit_ranks=None)
    assert all(pt["error_pct"] == pytest.approx(0.0, abs=1e-6) for pt in every.points)
    assert every.compute_per_update_s == pytest.approx(per_update)
    # Without the straggler term the same runs come out too fast, most where a step is one micro-batch.
    flat = pm.calibrate(pm.derive(prof, "test", step_cv=0.0), runs, fit_ranks=(1,))
    weak, strong = flat.points[3]["error_pct"], flat.points[2]["error_pct"]
    assert weak < strong < 0 and weak < -5
    # One 1-rank run cannot separate the two terms: per sample only, which under-predicts the held-out strong run
    # (its per-update work spread over 32 samples a step where the fitted run had 64).
    single = pm.calibrate(prof, [runs[0], runs[2]], fit_ranks=(1,))
    assert single.compute_per_update_s == 0.0 and single.points[1]["error_pct"] < -0.1
