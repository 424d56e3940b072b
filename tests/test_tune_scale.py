"""Carrying a tuned recipe to N GPUs: the LR/warmup/batch rules, and the jobs.scale command."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from classification.config import ClassifierConfig
from hvdtrain import parse_config
from hvdtrain.schedule import scale_lr
from jobs.scale import main as scale_main
from tuning.transfer import Reference, ScaleError, lr_factor, plan_for

REF = Reference(gpus=1, batch_size_per_gpu=4, accum=1, lr=1e-3, lr_rule="linear", warmup_epochs=1.0, epochs=30)


@pytest.mark.parametrize("rule,factor", [("linear", 8.0), ("sqrt", math.sqrt(8)), ("none", 1.0)])
def test_growing_the_global_batch_follows_the_rule(rule, factor):
    plan = plan_for(REF, 8, rule, warmup=5)
    assert plan.global_batch == 32 and (plan.batch_size_per_gpu, plan.accum) == (4, 1)
    assert plan.peak_lr == pytest.approx(1e-3 * factor, rel=1e-5)
    # What the trainer will train at: its own scaling of the written lr by the written rule over 8 GPUs.
    assert scale_lr(plan.lr, plan.lr_rule, 8) == pytest.approx(plan.peak_lr, rel=1e-5)
    if rule == "none":
        assert (plan.warmup_epochs, plan.epochs) == (1.0, 30)
    else:  # warmup lengthened to 5 epochs, added on top of the tuned schedule
        assert (plan.lr, plan.warmup_epochs, plan.epochs) == (1e-3, 5.0, 34)


def test_same_gpu_count_changes_nothing():
    plan = plan_for(REF, 1, "linear", warmup=5)
    assert (plan.lr, plan.warmup_epochs, plan.epochs, plan.global_batch) == (1e-3, 1.0, 30, 4)
    assert "nothing changes" in plan.notes[0]


def test_reference_tuned_on_two_gpus_with_another_rule():
    ref = Reference(gpus=2, batch_size_per_gpu=4, accum=2, lr=1e-3, lr_rule="sqrt", warmup_epochs=0, epochs=10)
    assert ref.global_batch == 16 and ref.peak_lr == pytest.approx(2e-3)  # sqrt(2 GPUs x 2 accum)
    plan = plan_for(ref, 8, "linear", warmup=3)
    assert plan.global_batch == 64 and plan.peak_lr == pytest.approx(8e-3)  # x4 global batch, linear
    assert scale_lr(plan.lr, "linear", 8 * 2) == pytest.approx(8e-3, rel=1e-5)
    assert (plan.warmup_epochs, plan.epochs) == (3, 13)
    down = plan_for(ref, 1, "linear", warmup=3)  # fewer GPUs than tuned: scaled down, no warmup added
    assert down.peak_lr == pytest.approx(1e-3) and down.warmup_epochs == 0


def test_keep_global_batch_splits_it_and_keeps_the_schedule():
    ref = Reference(gpus=4, batch_size_per_gpu=4, accum=1, lr=5e-4, lr_rule="linear", warmup_epochs=2, epochs=20)
    for gpus, split in [(1, (4, 4)), (2, (4, 2)), (4, (4, 1)), (8, (2, 1)), (16, (1, 1))]:
        plan = plan_for(ref, gpus, "linear", warmup=5, keep_global_batch=True)
        assert (plan.batch_size_per_gpu, plan.accum) == split and plan.global_batch == 16
        assert (plan.lr, plan.lr_rule, plan.peak_lr) == (2e-3, "none", 2e-3)
        assert (plan.warmup_epochs, plan.epochs) == (2, 20)
    with pytest.raises(ScaleError, match="does not split evenly"):
        plan_for(ref, 3, "linear", 5, keep_global_batch=True)
    with pytest.raises(ScaleError, match="does not split evenly"):
        plan_for(ref, 32, "linear", 5, keep_global_batch=True)


def test_too_few_samples_for_the_global_batch():
    ref = Reference(1, 4, 1, 1e-3, "linear", 0, 10, train_samples=100)
    assert plan_for(ref, 16, "linear", 5).steps_per_epoch == 1
    assert any("under 10 steps" in n for n in plan_for(ref, 16, "linear", 5).notes)
    with pytest.raises(ScaleError, match="more than the 100 training samples"):
        plan_for(ref, 32, "linear", 5)
    with pytest.raises(ScaleError, match="unknown rule"):
        lr_factor("cubic", 2)


def test_scale_job_writes_configs_and_scripts(tmp_path, capsys):
    best = tmp_path / "best.yaml"
    best.write_text("model: small_cnn\nlr: 0.002\nbatch_size_per_gpu: 8\nwarmup_epochs: 0\nepochs: 10\n")
    (tmp_path / "best_meta.json").write_text(json.dumps({"task": "classifier", "tuned_gpus": 1, "train_samples": 600}))
    out = tmp_path / "scaled"
    args = ["--best", str(best), "--gpus", "1,2,4,16", "--rule", "linear", "--warmup", "3", "--out", str(out)]
    assert scale_main([*args, "--render"]) == 0
    assert "peak LR 0.002 -> 0.032 (linear rule: x16)" in capsys.readouterr().out
    for gpus in (1, 2, 4, 16):
        cfg = parse_config(ClassifierConfig, ["--config", str(out / f"classifier_{gpus}gpu.yaml")])
        assert cfg.model == "small_cnn" and cfg.lr == 0.002 and cfg.lr_rule == "linear"
        assert scale_lr(cfg.lr, cfg.lr_rule, gpus) == pytest.approx(0.002 * gpus)
        assert (cfg.warmup_epochs, cfg.epochs) == ((0.0, 10) if gpus == 1 else (3.0, 13))
    assert not (out / "classifier_2gpu.sh").exists()  # counts up to 2 run here (--launch-local)
    script = (out / "classifier_16gpu.sh").read_text()
    assert "#SBATCH --nodes=4" in script and "classifier_16gpu.yaml" in script and "jobs.train_classifier" in script
    assert "| 16 | 128 | 8 x 1 |" in (out / "plan.md").read_text()
    # Keeping the global batch: 8 = 4 x 2 x 1 on 2 GPUs, no rule.
    assert scale_main([*args[:3], "1,2", "--keep-global-batch", "--out", str(out / "k")]) == 0
    kept = yaml.safe_load((out / "k" / "classifier_2gpu.yaml").read_text())
    assert (kept["batch_size_per_gpu"], kept["lr_rule"], kept["lr"]) == (4, "none", 0.002)


def test_scale_job_errors(tmp_path, capsys):
    best = tmp_path / "best.yaml"
    best.write_text("lr: 0.002\n")
    base = ["--best", str(best), "--out", str(tmp_path / "o")]
    assert scale_main([*base, "--gpus", "1,2"]) == 2
    assert "--task" in capsys.readouterr().err  # no best_meta.json to say which trainer
    assert scale_main([*base, "--gpus", "1,x", "--task", "unet"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    # A count that cannot work is skipped (exit 1); the others are still written.
    assert scale_main([*base, "--gpus", "1,64", "--task", "unet", "--train-samples", "50"]) == 1
    assert "64 GPUs" in capsys.readouterr().err and (tmp_path / "o" / "unet_1gpu.yaml").is_file()


MLPERF = "jobs/configs/lr_table_mlperf_unet3d.yaml"
TABLE = ("2:0.8:200", "32:4.0:1000", "56:2.0:1000", "80:1.5:1000")


def test_table_rule_takes_lr_and_warmup_from_the_row_of_the_global_batch():
    ref = Reference(1, 2, 1, 1e-4, "none", 0, 100, train_samples=4096)
    plans = {n: plan_for(ref, n, "table", 5, table=TABLE) for n in (1, 8, 16, 28, 40)}
    got = {n: (p.global_batch, p.peak_lr, p.warmup_epochs, p.epochs) for n, p in plans.items()}
    assert got == {
        1: (2, 0.8, 200, 300),
        8: (16, 0.8, 200, 300),  # between rows: batch 2's row
        16: (32, 4.0, 1000, 1100),
        28: (56, 2.0, 1000, 1100),
        40: (80, 1.5, 1000, 1100),
    }
    for p in plans.values():
        assert (p.lr, p.lr_rule, p.batch_size_per_gpu, p.accum) == (1e-4, "none", 2, 1)  # the ramp starts at lr
        assert p.changes()["lr_table"] == [[2, 0.8, 200.0], [32, 4.0, 1000.0], [56, 2.0, 1000.0], [80, 1.5, 1000.0]]
    assert any("row for batch 32" in n for n in plans[16].notes)
    # Keeping the global batch: one row at every count.
    kept = [plan_for(Reference(1, 64, 1, 1e-4, "none", 0, 100), n, "table", 5, True, TABLE) for n in (1, 4, 16)]
    assert {(p.global_batch, p.peak_lr, p.warmup_epochs) for p in kept} == {(64, 2.0, 1000)}
    assert [(p.batch_size_per_gpu, p.accum) for p in kept] == [(64, 1), (16, 1), (4, 1)]
    with pytest.raises(ScaleError, match="1 GPUs: --lr-table has no row for global batch 1"):
        plan_for(Reference(1, 1, 1, 1e-4, "none", 0, 10), 1, "table", 5, table=TABLE)
    with pytest.raises(ScaleError, match="needs a batch -> \\(LR, warmup\\) table"):
        plan_for(ref, 2, "table", 5)
    with pytest.raises(ScaleError, match="not as a factor"):
        lr_factor("table", 2)
    # Other rules on the linear/sqrt path are unchanged and drop the table (changes: lr_table None).
    assert plan_for(ref, 2, "linear", 5).changes()["lr_table"] is None


def test_reference_tuned_with_a_table_has_the_tables_peak():
    ref = Reference(2, 8, 1, 1e-4, "linear", 1000, 10, lr_table=TABLE)  # global batch 16 -> row 2
    assert ref.peak_lr == 0.8
    assert plan_for(ref, 4, "linear", 5).peak_lr == pytest.approx(1.6)


def test_scale_job_table_rule_writes_each_count_from_the_table(tmp_path, capsys):
    best = tmp_path / "best.yaml"
    best.write_text("lr: 0.0001\nbatch_size_per_gpu: 2\nwarmup_epochs: 0\nepochs: 100\noptimizer: sgd\n")
    out = tmp_path / "t"
    args = ["--best", str(best), "--task", "unet", "--gpus", "1,16,28,40", "--rule", "table", "--out", str(out)]
    assert scale_main([*args, "--lr-table", MLPERF]) == 0
    printed = capsys.readouterr().out
    assert "peak LR 0.0001 -> 4 and warmup 0 -> 1000 epochs from the table's row for batch 32" in printed
    from hvdtrain import batching
    from segmentation.config import UNetConfig

    for gpus, peak, warmup in ((1, 0.8, 200), (16, 4.0, 1000), (28, 2.0, 1000), (40, 1.5, 1000)):
        cfg = parse_config(UNetConfig, ["--config", str(out / f"unet_{gpus}gpu.yaml")])
        assert (cfg.lr, cfg.lr_rule, cfg.warmup_epochs) == (0.0001, "none", warmup)
        # The trainer reads the same peak and warmup from the written table on that many ranks.
        resolved = batching.resolve(cfg, gpus)
        assert batching.peak_lr(resolved, gpus) == peak and resolved.warmup_epochs == warmup
    plan = (out / "plan.md").read_text()
    assert "LR and warmup from the table" in plan and "| 16 | 32 | 2 x 1 | 0.0001 | table | 4 | 1000 | 1100 |" in plan
    # The table can come from best.yaml itself; other rules then drop it from the configs.
    best.write_text(best.read_text() + "lr_table: ['2:0.8:200', '32:4.0:1000']\n")
    assert scale_main([*args[:5], "1,16", "--rule", "table", "--out", str(tmp_path / "b")]) == 0
    assert yaml.safe_load((tmp_path / "b" / "unet_16gpu.yaml").read_text())["warmup_epochs"] == 1000
    assert scale_main([*args[:5], "1,2", "--rule", "linear", "--out", str(tmp_path / "l")]) == 0
    linear = (tmp_path / "l" / "unet_2gpu.yaml").read_text()
    assert "lr_table" not in yaml.safe_load(linear) and "the tuned lr_table is dropped" in linear
    assert yaml.safe_load(linear)["lr"] == pytest.approx(0.8)  # peak 0.8 (the table's, batch 2) x2 / 2 GPUs
    capsys.readouterr()
    best.write_text("lr: 0.0001\n")
    assert scale_main([*args[:5], "1", "--rule", "table", "--out", str(tmp_path / "e")]) == 2
    assert "--rule table needs --lr-table" in capsys.readouterr().err
