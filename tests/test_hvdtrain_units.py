"""Unit tests of each hvdtrain piece in one process (the multi-rank behaviour is in test_hvd_multirank.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from hvdtrain import (
    Run,
    SplitStep,
    TrainConfig,
    batching,
    checkpoint,
    data,
    dist,
    fit,
    parse_config,
    seeding,
    syncbn,
    to_dict,
)
from hvdtrain.config import ConfigError, load_yaml
from hvdtrain.loop import autocast_dtype, evaluate
from hvdtrain.metrics import MeanMetric, SumMetric
from hvdtrain.optimizers import LAMB, LARS, build_optimizer, param_groups
from hvdtrain.runlog import RunLog
from hvdtrain.schedule import LRSchedule, scale_lr
from hvdtrain.testing import ToyMetric, ToyNet, eval_fn, make_blobs, step_fn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_rank():
    dist.init(threads=1)


# ---------------------------------------------------------------- dist


def test_one_process_is_rank_zero_of_one_without_horovod():
    d = dist.info()
    assert (d.rank, d.local_rank, d.size, d.local_size) == (0, 0, 1, 1)
    assert dist.is_main() and not dist.uses_horovod()
    assert "horovod.torch" not in sys.modules  # one process never imports Horovod


def test_allreduce_keeps_the_kind_of_its_input():
    assert dist.allreduce(3) == 3 and isinstance(dist.allreduce(3), int)
    assert dist.allreduce(2.5, op="mean") == 2.5
    a = dist.allreduce(np.array([1, 2], dtype=np.int32))
    assert a.dtype == np.int32 and a.tolist() == [1, 2]
    t = dist.allreduce(torch.tensor([1, 3]), op="mean")  # a mean of integers is a float
    assert t.is_floating_point() and t.tolist() == [1.0, 3.0]
    x = torch.ones(2, requires_grad=True)
    assert not dist.allreduce(x).requires_grad
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        dist.allreduce(1, op="max")
    with pytest.raises(TypeError, match="str"):
        dist.allreduce("1")


def test_objects_and_print0_on_one_rank(capsys):
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.allgather_object(7) == [7]
    dist.barrier()
    dist.print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    t = torch.ones(2, requires_grad=True)
    assert dist.allreduce_sum_grad(t) is t


def _threads_in_fresh_process(env: dict[str, str]) -> int:
    code = "from hvdtrain import dist; import torch; dist.init(); print(torch.get_num_threads())"
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(p.stdout.split()[-1])


def test_thread_count_follows_omp_num_threads_then_the_cores():
    assert _threads_in_fresh_process({"OMP_NUM_THREADS": "1"}) == 1
    cores = len(os.sched_getaffinity(0))
    assert _threads_in_fresh_process({}) == cores  # one local rank owns every core it may run on


# ---------------------------------------------------------------- data


def _batches(sampler: data.ShardedTrainSampler, batch: int) -> list[list[int]]:
    idx = list(sampler)
    return [idx[i : i + batch] for i in range(0, len(idx), batch)]


def test_sharded_ranks_together_see_the_one_rank_global_batches():
    n, b = 23, 2
    one = _batches(data.ShardedTrainSampler(n, 2 * b, rank=0, size=1, seed=5), 2 * b)
    r0 = _batches(data.ShardedTrainSampler(n, b, rank=0, size=2, seed=5), b)
    r1 = _batches(data.ShardedTrainSampler(n, b, rank=1, size=2, seed=5), b)
    assert len(r0) == len(r1) == len(one) == 23 // 4  # equal steps on every rank, the ragged tail dropped
    for g, a, c in zip(one, r0, r1):
        assert sorted(a + c) == sorted(g)
    flat = [i for bt in r0 + r1 for i in bt]
    assert len(flat) == len(set(flat))  # no sample twice in an epoch


def test_sharded_sampler_reshuffles_per_epoch_reproducibly_and_resumes_mid_epoch():
    s = data.ShardedTrainSampler(40, 4, rank=1, size=2, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and sorted(e0) != list(range(40))
    s2 = data.ShardedTrainSampler(40, 4, rank=1, size=2, seed=3)
    s2.set_epoch(1)
    assert list(s2) == e1
    s2.set_epoch(1, skip_batches=2)
    assert list(s2) == e1[8:] and len(s2) == len(e1) - 8
    assert list(data.ShardedTrainSampler(40, 4, 0, 2, seed=4)) != list(data.ShardedTrainSampler(40, 4, 0, 2, seed=3))


def test_sharded_sampler_holds_whole_accumulation_steps_and_rejects_tiny_sets():
    s = data.ShardedTrainSampler(50, 2, rank=0, size=2, micro_per_step=3)  # global step = 12 samples
    assert len(s) == 50 // 12 * 3 * 2
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.ShardedTrainSampler(7, 2, rank=0, size=2, micro_per_step=2)


@pytest.mark.parametrize("accum", [1, 2])
def test_simulated_gpu_j_of_rank_r_gets_the_samples_of_real_rank_r_n_plus_j(accum):
    n, b = 2, 3  # 2 ranks x 2 simulated GPUs stand for 4 ranks
    sim = _batches(data.ShardedTrainSampler(61, b, 1, 2, seed=5, micro_per_step=n * accum, simulate_gpus=n), b)
    for j in range(n):
        real = _batches(data.ShardedTrainSampler(61, b, 1 * n + j, 4, seed=5, micro_per_step=accum), b)
        # The step's micro-batches come GPU by GPU: micro-batch j x accum + a of step s is GPU j's (s x accum + a)-th.
        mine = [sim[s * n * accum + j * accum + a] for s in range(len(real) // accum) for a in range(accum)]
        assert mine == real
    with pytest.raises(ValueError, match="not a multiple of simulate_gpus"):
        data.ShardedTrainSampler(61, b, 0, 1, micro_per_step=3, simulate_gpus=2)


@pytest.mark.parametrize("n,size", [(5, 2), (1, 4), (8, 3), (0, 2)])
def test_evaluation_shards_visit_each_sample_exactly_once(n, size):
    shards = [list(data.EvalShardSampler(n, r, size)) for r in range(size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(data.EvalShardSampler(n, r, size)) for r in range(size)] == [len(s) for s in shards]


class _EpochAware(Dataset):
    def __init__(self):
        self.epochs: list[int] = []

    def set_epoch(self, e: int) -> None:
        self.epochs.append(e)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def test_set_epoch_reaches_sampler_dataset_and_worker_seed():
    ds = _EpochAware()
    loader = data.train_loader(ds, 2, seed=1)
    data.set_epoch(loader, 3, skip_batches=1)
    assert ds.epochs == [3] and loader.sampler.epoch == 3 and len(loader) == 3
    first = loader.generator.initial_seed()
    data.set_epoch(loader, 3)
    assert loader.generator.initial_seed() == first  # from (seed, epoch, rank), not the loader's history
    data.set_epoch(loader, 4)
    assert loader.generator.initial_seed() != first
    ev = data.eval_loader(TensorDataset(torch.arange(5)), batch_size=2)
    assert [int(i) for (b,) in ev for i in b] == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- seeding


def _draw(seed: int, rank: int, simulate_gpus: int, accum: int, step: int, micro: int) -> torch.Tensor:
    seeding.seed_micro_batch(seed, rank, simulate_gpus, accum, step, micro)
    return torch.rand(8)


def test_simulated_gpu_j_of_rank_r_draws_the_stream_of_real_rank_r_n_plus_j():
    n, accum = 3, 2
    for step in (0, 7):
        for m in range(n * accum):
            j, a = divmod(m, accum)
            assert torch.equal(_draw(5, 1, n, accum, step, m), _draw(5, 1 * n + j, 1, accum, step, a))
    draws = [_draw(5, r, 1, 1, 0, 0) for r in range(4)]  # real ranks: independent streams
    assert all(not torch.equal(draws[i], draws[k]) for i in range(4) for k in range(i))
    assert not torch.equal(_draw(5, 0, 1, 1, 0, 0), _draw(5, 0, 1, 1, 1, 0))  # a new stream each step
    assert not torch.equal(_draw(5, 0, 1, 1, 0, 0), _draw(6, 0, 1, 1, 0, 0))  # and per seed
    with pytest.raises(ValueError, match="outside 0..2"):
        seeding.gpu_index(0, 3, 3)


def test_the_loop_gives_simulated_gpu_j_of_rank_r_what_real_rank_r_n_plus_j_gets(tmp_path, monkeypatch):
    """Data and dropout stream per micro-batch, through `fit`, with `dist.info()` standing in for the launcher."""

    def run(rank: int, size: int, simulate_gpus: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        monkeypatch.setattr(dist, "_info", dist.DistInfo(rank, rank, size, size))
        seen = []

        def record(model, batch, device):
            seen.append((batch[0], torch.rand(4)))  # the micro-batch's data and the start of its stream
            return step_fn(model, batch, device)

        _fit(tmp_path / f"r{rank}of{size}", epochs=2, step=record, simulate_gpus=simulate_gpus)
        return seen

    sim = run(1, 2, 2)  # rank 1 of 2 plays GPUs 2 and 3 of 4
    real = run(3, 4, 1)  # rank 3 of 4
    mine = sim[1::2]  # the step's 2nd micro-batch is simulated GPU 1 = GPU 3
    assert len(mine) == len(real) == 8
    for (x, r), (x_real, r_real) in zip(mine, real):
        assert torch.equal(x, x_real) and torch.equal(r, r_real)
    assert not torch.equal(sim[0][1], sim[1][1])


def test_sample_rng_keys_draws_by_sample_and_leaves_the_callers_stream_alone():
    torch.manual_seed(0)
    with seeding.sample_rng(3, 1, 10):
        a = torch.rand(4)
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(4), after)  # the caller's generator is restored
    torch.manual_seed(99)  # whatever the process's state: the same sample draws the same
    with seeding.sample_rng(3, 1, 10):
        assert torch.equal(torch.rand(4), a)
    for key in ((3, 1, 11), (3, 2, 10), (4, 1, 10)):
        with seeding.sample_rng(*key):
            assert not torch.equal(torch.rand(4), a)


# ---------------------------------------------------------------- strong scaling


@pytest.mark.parametrize(
    "g,gpus,cap,expected", [(64, 4, 8, (8, 2)), (64, 4, 16, (16, 1)), (48, 2, 5, (4, 6)), (7, 7, 3, (1, 1))]
)
def test_global_batch_splits_into_the_largest_micro_batch_that_fits(g, gpus, cap, expected):
    assert batching.split_global_batch(g, gpus, cap) == expected


def test_a_global_batch_that_does_not_divide_names_the_multiples():
    with pytest.raises(batching.BatchingError, match=r"--global-batch 10 does not divide over 3 GPU.*such as 9 or 12"):
        batching.split_global_batch(10, 3, 4)
    with pytest.raises(batching.BatchingError, match="multiple of 4 such as 4$"):
        batching.split_global_batch(2, 4, 8)


def test_resolve_derives_batch_and_accumulation_and_the_lr_stays_fixed():
    cfg = TrainConfig(global_batch=16, batch_size_per_gpu=4, lr=0.1, lr_rule="linear")
    for ranks, sim, want in ((1, 1, (4, 4)), (2, 1, (4, 2)), (1, 2, (4, 2)), (4, 1, (4, 1)), (8, 2, (1, 1))):
        r = batching.resolve(dataclasses.replace(cfg, simulate_gpus=sim), ranks)
        assert (r.batch_size_per_gpu, r.accum) == want and batching.check(r, ranks) == 16
        assert batching.resolve(r, ranks) == r  # idempotent
        assert batching.peak_lr(r, ranks * sim) == 0.1  # not scaled by the GPU count
    weak = TrainConfig(batch_size_per_gpu=4, lr=0.1, lr_rule="linear", accum=2)
    assert batching.resolve(weak, 4) == weak and batching.peak_lr(weak, 4) == pytest.approx(0.8)
    with pytest.raises(batching.BatchingError, match="resolve"):
        batching.check(cfg, 2)  # 4/GPU x 2 x accum 1 = 8, not 16
    with pytest.raises(batching.BatchingError, match="leave --accum at 1"):
        batching.resolve(dataclasses.replace(cfg, accum=3), 2)


MLPERF_TABLE = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "lr_table_mlperf_unet3d.yaml"


def test_lr_table_row_is_the_largest_batch_not_above_the_global_batch():
    rows = ["32:4.0:1000", "2:0.8:200", "56:2.0:1000", "80:1.5:1000"]  # any order
    assert batching.parse_lr_table(rows)[0] == (2, 0.8, 200.0)
    assert batching.lr_table_row(rows, 32) == (32, 4.0, 1000.0)  # exact row
    assert batching.lr_table_row(rows, 2) == (2, 0.8, 200.0)
    assert batching.lr_table_row(rows, 16) == (2, 0.8, 200.0)  # between rows: the row below
    assert batching.lr_table_row(rows, 64) == (56, 2.0, 1000.0)
    assert batching.lr_table_row(rows, 84) == batching.lr_table_row(rows, 4096) == (80, 1.5, 1000.0)
    with pytest.raises(batching.BatchingError, match="no row for global batch 1: its smallest batch is 2"):
        batching.lr_table_row(rows, 1)
    # YAML rows, and the MLPerf preset as a file.
    assert batching.lr_table_row([[2, 0.8, 200], [32, 4, 1000]], 40) == (32, 4.0, 1000.0)
    mlperf = batching.parse_lr_table([str(MLPERF_TABLE)])
    assert mlperf == ((2, 0.8, 200.0), (32, 4.0, 1000.0), (56, 2.0, 1000.0), (80, 1.5, 1000.0))
    for bad, match in (
        (["2:0.8"], "BATCH:LR:WARMUP"),
        (["2:x:200"], "needs numbers"),
        (["0:0.8:200"], "whole batch >= 1"),
        (["2.5:0.8:200"], "whole batch >= 1"),
        (["2:-1:200"], "LR > 0"),
        ([7320], "quote rows in YAML"),  # what YAML makes of an unquoted 2:2:0
        (["2:0.8:200", "2:0.4:100"], "global batch 2 has more than one row"),
        (["missing.yaml"], "missing.yaml does not exist"),
    ):
        with pytest.raises(batching.BatchingError, match=match):
            batching.parse_lr_table(bad)


def test_lr_table_gives_peak_lr_and_warmup_in_weak_and_strong_scaling(tmp_path):
    table = ("2:0.8:200", "32:4.0:1000", "56:2.0:1000", "80:1.5:1000")
    weak = TrainConfig(batch_size_per_gpu=2, lr=1e-4, lr_rule="sqrt", warmup_epochs=5, lr_table=table)
    for ranks, sim, peak, warmup in ((1, 1, 0.8, 200), (4, 4, 4.0, 1000), (16, 2, 2.0, 1000), (40, 1, 1.5, 1000)):
        r = batching.resolve(dataclasses.replace(weak, simulate_gpus=sim), ranks)
        assert r.warmup_epochs == warmup and batching.peak_lr(r, ranks * sim) == peak  # not the sqrt rule
        assert batching.resolve(r, ranks) is r  # idempotent
    # Strong scaling: the global batch, hence the row, is the same at every GPU count.
    strong = TrainConfig(global_batch=64, batch_size_per_gpu=4, lr=1e-4, lr_table=table)
    for ranks in (1, 2, 4, 16):
        r = batching.resolve(strong, ranks)
        assert (batching.peak_lr(r, ranks), r.warmup_epochs, batching.check(r, ranks)) == (2.0, 1000, 64)
    with pytest.raises(batching.BatchingError, match="gives global batch 64 a warmup of 1000 epochs, the config 1"):
        batching.check(dataclasses.replace(strong, batch_size_per_gpu=16), 4)  # not resolved: warmup still 1
    with pytest.raises(batching.BatchingError, match="no row for global batch 1"):
        batching.resolve(dataclasses.replace(weak, batch_size_per_gpu=1), 1)
    # From flags (rows or the preset file) and from a YAML preset with rows; resolve writes the rows out.
    flags = parse_config(TrainConfig, ["--lr-table", *table[:2]])
    assert batching.resolve(flags, 16).lr_table == ("2:0.8:200.0", "32:4.0:1000.0")
    from_file = batching.resolve(parse_config(TrainConfig, ["--lr-table", str(MLPERF_TABLE)]), 1)
    assert from_file.lr_table[-1] == "80:1.5:1000.0" and from_file.warmup_epochs == 200
    preset = tmp_path / "p.yaml"
    preset.write_text("batch_size_per_gpu: 2\nlr_table:\n  - [2, 0.8, 200]\n  - [32, 4.0, 1000]\n")
    cfg = batching.resolve(parse_config(TrainConfig, ["--config", str(preset)]), 16)
    assert batching.peak_lr(cfg, 16) == 4.0 and cfg.warmup_epochs == 1000


def test_fit_takes_the_peak_lr_and_warmup_from_the_table(tmp_path):
    # ToyNet, 64 samples: 1 GPU x 4 = global batch 4 -> row 4 (LR 0.2, 1 warmup epoch); 2 simulated GPUs -> row 8.
    table = ("4:0.2:1", "8:0.1:0")
    out, _ = _fit(tmp_path / "one", lr=0.01, lr_rule="linear", lr_table=table, epochs=2, schedule="constant")
    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert out["lr"] == cfg["peak_lr"] == 0.2 and cfg["warmup_epochs"] == 1.0
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(0.2)
    sim, _ = _fit(tmp_path / "two", lr=0.01, lr_rule="linear", lr_table=table, simulate_gpus=2, epochs=1)
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert sim["lr"] == cfg["peak_lr"] == 0.1 and cfg["warmup_epochs"] == 0.0 and cfg["global_batch"] == 8


def test_strong_scaling_is_the_same_optimisation_on_one_and_on_simulated_gpus(tmp_path):
    """--global-batch 16: 1 GPU (4 x accum 4), 2 simulated GPUs (4 x accum 2), 4 (4 x 1): same steps, LR, weights."""
    runs = {}
    for sim in (1, 2, 4):
        over = dict(global_batch=16, simulate_gpus=sim, lr_rule="linear", warmup_epochs=1.0, epochs=2, dropout=0.0)
        summary, model = _fit(tmp_path / f"sim{sim}", **over)
        lrs = [json.loads(x)["lr"] for x in (tmp_path / f"sim{sim}" / "metrics.jsonl").read_text().splitlines()]
        runs[sim] = (summary, lrs, _weights(model))
    s1, lr1, w1 = runs[1]
    assert (s1["global_batch"], s1["scaling"], s1["accum"], s1["steps_per_epoch"], s1["lr"]) == (
        16,
        "strong",
        4,
        4,
        0.05,
    )
    for sim in (2, 4):
        s, lrs, w = runs[sim]
        assert (s["global_batch"], s["gpus"], s["steps_per_epoch"], s["lr"]) == (16, sim, 4, 0.05)
        assert s["accum"] == 4 // sim and lrs == lr1  # the same LR at every logged step
        assert torch.allclose(w, w1, atol=1e-5)
    cfg = json.loads((tmp_path / "sim2" / "config.json").read_text())
    assert (cfg["global_batch"], cfg["scaling"], cfg["peak_lr"]) == (16, "strong", 0.05)


@pytest.mark.parametrize("size,batch,micro", [(2, 4, 2), (2, 8, 1), (1, 2, 8)])
def test_a_strong_scaling_resume_on_another_gpu_count_keeps_the_step(monkeypatch, size, batch, micro):
    """Saved: 1 GPU, 4/GPU x accum 4 (global 16), 2 of 4 steps into epoch 1; resumed with another split of 16."""
    from types import SimpleNamespace

    from hvdtrain import resume

    monkeypatch.setattr(dist, "_info", dist.DistInfo(0, 0, size, size))
    state = SimpleNamespace(epoch=1, step=6, batch_in_epoch=8)
    resume.adapt_position(state, {"config": {"world_size": 1, "batch_size_per_gpu": 4}}, micro, 4, batch)
    assert (state.step, state.batch_in_epoch) == (6, 2 * micro)  # 2 steps of 16 samples into the epoch, as before


# ---------------------------------------------------------------- sync batch norm


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.BatchNorm2d(4, momentum=None))
    )


def test_convert_swaps_batch_norm_layers_in_place_sharing_parameters_and_keys():
    net = _bn_net()
    before = {k: v.data_ptr() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    assert syncbn.convert(net, syncbn.CPUSyncBatchNorm) == 2
    assert isinstance(net[1], syncbn.CPUSyncBatchNorm) and isinstance(net[3][0], syncbn.CPUSyncBatchNorm)
    assert {k: v.data_ptr() for k, v in net.state_dict().items()} == before  # same keys, same tensors
    assert all(a is b for a, b in zip(net.parameters(), params))  # an optimizer built earlier still fits
    assert syncbn.sync_batch_norm(net, torch.device("cpu")) == 0  # one rank: nothing to synchronise


def test_cpu_sync_batch_norm_computes_batch_norm(monkeypatch):
    """The synchronised path with a one-rank 'allreduce' is BatchNorm: outputs, gradients, running statistics."""
    monkeypatch.setattr(dist, "uses_horovod", lambda: True)
    monkeypatch.setattr(dist, "allreduce_sum_grad", lambda t: t)
    plain, synced = _bn_net(), _bn_net()
    syncbn.convert(synced, syncbn.CPUSyncBatchNorm)
    x = torch.randn(5, 3, 7, 6, generator=torch.Generator().manual_seed(2)) * 4 + 30  # a large mean
    for k in range(3):
        ya, yb = plain(x * (k + 1)), synced(x * (k + 1))
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    (ya**2).sum().backward()
    (yb**2).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), synced.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-3, rtol=1e-4, msg=name)
    for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    plain.eval(), synced.eval()
    torch.testing.assert_close(synced(x), plain(x), atol=1e-5, rtol=1e-5)


def test_sync_bn_refuses_a_model_without_batch_norm_and_simulated_gpus(tmp_path):
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        _fit(tmp_path / "a", epochs=1, sync_bn=True)  # ToyNet: no BatchNorm
    torch.manual_seed(0)
    cfg = TrainConfig(run_dir=str(tmp_path / "b"), sync_bn=True, simulate_gpus=2, progress=False)
    with pytest.raises(ValueError, match="needs the task's step function as a hvdtrain.SplitStep"):
        fit(
            Run(_bn_net(), data.train_loader(make_blobs(16), 2, micro_per_step=2), None, step_fn, eval_fn, ToyMetric),
            cfg,
        )
    split = SplitStep(lambda b, d: (b[0], {}, lambda out: (torch.nn.functional.cross_entropy(out, b[1]), 2)))
    cfg = TrainConfig(run_dir=str(tmp_path / "c"), fuse_simulated=True, simulate_gpus=2, progress=False)
    with pytest.raises(ValueError, match="--fuse-simulated: the model has BatchNorm"):
        fit(
            Run(_bn_net(), data.train_loader(make_blobs(16), 2, micro_per_step=2), None, split, eval_fn, ToyMetric), cfg
        )


# ---------------------------------------------------------------- metrics


def test_metrics_accumulate_locally_and_finalize():
    m = MeanMetric("loss")
    assert math.isnan(m.compute()["loss"])  # nothing seen: NaN, not a division error
    m.update(3.0, 2)
    m.update(1.0, 2)
    assert m.compute() == {"loss": 1.0, "count": 4.0}
    m.reset()
    assert m.compute()["count"] == 0
    s = SumMetric("tp", "fn")
    s.add(tp=2, fn=1)
    s.add(tp=1)
    assert s.compute() == {"tp": 3.0, "fn": 1.0}
    with pytest.raises(ValueError):
        s.add(fp=1)


# ---------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class _Cfg(TrainConfig):
    patch: tuple[int, ...] = (8, 8)
    name: str = "x"


def test_config_precedence_defaults_then_yaml_then_flags(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("epochs: 7\nlr: 1\nbatch-size-per-gpu: 3\npatch: [4, 4, 4]\nprogress: true\n")
    cfg = parse_config(_Cfg, ["--config", str(yml), "--lr", "0.5", "--no-progress"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size_per_gpu, cfg.patch, cfg.progress) == (7, 0.5, 3, (4, 4, 4), False)
    assert isinstance(parse_config(_Cfg, ["--config", str(yml)]).lr, float)  # 1 in YAML is still a float
    assert parse_config(_Cfg, []).epochs == TrainConfig().epochs
    assert to_dict(cfg)["patch"] == [4, 4, 4]
    assert json.loads(json.dumps(to_dict(cfg)))["name"] == "x"


@pytest.mark.parametrize(
    "text,message",
    [
        ("epochz: 3\n", "unknown field(s) epochz"),
        ("lr_rule: cubic\n", "lr_rule='cubic' is not one of"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("a: [1\n", "not valid YAML"),
    ],
)
def test_bad_config_files_exit_with_the_file_and_the_problem(tmp_path, capsys, text, message):
    yml = tmp_path / "bad.yaml"
    yml.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_config(_Cfg, ["--config", str(yml)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert message in err and str(yml) in err


def test_missing_config_file_and_bad_flag_choice(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    with pytest.raises(SystemExit):
        parse_config(_Cfg, ["--optimizer", "rmsprop"])
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------- schedule


def test_lr_scaling_rules():
    assert scale_lr(0.1, "linear", 8) == pytest.approx(0.8)
    assert scale_lr(0.1, "sqrt", 16) == pytest.approx(0.4)
    assert scale_lr(0.1, "none", 64) == 0.1
    with pytest.raises(ValueError, match="unknown lr rule"):
        scale_lr(0.1, "log", 2)
    with pytest.raises(ValueError, match="> 0"):
        scale_lr(0.1, "linear", 0)


def test_warmup_ramps_from_base_to_peak_then_each_decay():
    s = LRSchedule("cosine", 0.1, 0.8, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(5) == pytest.approx(0.45)
    assert s.lr_at(10) == pytest.approx(0.8) and s.lr_at(60) == pytest.approx(0.08 + 0.72 * 0.5)
    assert s.lr_at(110) == pytest.approx(0.08) and s.lr_at(500) == pytest.approx(0.08)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    p = LRSchedule("poly", 1.0, 1.0, total_steps=100, power=0.9)
    assert p.lr_at(50) == pytest.approx(0.5**0.9) and p.lr_at(100) == 0
    st = LRSchedule("step", 1.0, 1.0, total_steps=100, step_every=30, gamma=0.1)
    assert [st.lr_at(i) for i in (29, 30, 65)] == pytest.approx([1.0, 0.1, 0.01])
    assert LRSchedule("constant", 0.3, 0.3, 10).lr_at(9) == 0.3
    with pytest.raises(ValueError, match="unknown schedule"):
        LRSchedule("exp", 1, 1, 10)


def test_plateau_decays_after_patience_and_round_trips_its_state():
    s = LRSchedule("plateau", 1.0, 1.0, 100, gamma=0.5, patience=2, mode="max")
    for v in (0.5, 0.6, 0.6, 0.55):  # best 0.6, then two epochs without improvement: still patient
        s.epoch_end(v)
    assert s.lr_at(0) == 1.0
    s.epoch_end(float("nan"))  # a missing value is not an epoch without improvement
    s.epoch_end(None)
    assert s.lr_at(0) == 1.0
    s.epoch_end(0.59)
    assert s.lr_at(0) == 0.5
    t = LRSchedule("plateau", 1.0, 1.0, 100, gamma=0.5, patience=2, mode="max")
    t.load_state_dict(s.state_dict())
    assert t.lr_at(0) == 0.5 and t.best == 0.6
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=9.0)
    assert t.apply(opt, 3) == 0.5 and opt.param_groups[0]["lr"] == 0.5


# ---------------------------------------------------------------- optimizers


def _regression(opt_name: str, lr: float, steps: int = 60) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    opt = build_optimizer(model, opt_name, lr, weight_decay=1e-4)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


@pytest.mark.parametrize(
    "name,lr,steps", [("sgd", 0.05, 60), ("adamw", 0.01, 60), ("lamb", 0.02, 60), ("lars", 0.5, 150)]
)
def test_every_optimizer_trains(name, lr, steps):
    first, last = _regression(name, lr, steps)
    assert last < 0.5 * first


def test_lamb_and_lars_scale_each_layer_by_its_trust_ratio():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 4) * 3)
    b = nn.Parameter(torch.ones(4))
    before_w, before_b = w.detach().clone(), b.detach().clone()
    opt = LAMB([w, b], lr=0.01)
    w.grad, b.grad = torch.randn(4, 4) * 1e-3, torch.full((4,), 1e-3)
    opt.step()
    # The first Adam update has entries of about +-1; the trust ratio rescales a matrix to lr x ||w||.
    assert float((w.detach() - before_w).norm()) == pytest.approx(0.01 * float(before_w.norm()), rel=1e-3)
    assert float((b.detach() - before_b).abs().max()) == pytest.approx(0.01, rel=1e-3)  # 1-D: no trust ratio
    v = nn.Parameter(torch.randn(3, 3))
    before_v = v.detach().clone()
    lars = LARS([v], lr=1.0, momentum=0.0, trust_coef=0.001)
    v.grad = torch.randn(3, 3) * 50
    lars.step()
    assert float((v.detach() - before_v).norm()) == pytest.approx(0.001 * float(before_v.norm()), rel=1e-4)


def test_weight_decay_skips_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.ndim for p in decay["params"]] == [4] and len(no_decay["params"]) == 3
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "adagrad", 0.1, 0.0)


def test_optimizer_wrapping_is_transparent_on_one_rank():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert dist.distribute_optimizer(opt, model, backward_passes_per_step=4) is opt
    dist.synchronize(opt)
    dist.broadcast_parameters(model)
    with dist.skip_synchronize(opt):
        opt.step()


def test_autocast_is_fp32_on_the_cpu():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is None


# ---------------------------------------------------------------- checkpoint


def test_save_is_atomic_and_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save(path, {"step": 3, "epoch": 1, "w": torch.ones(2)})
    assert json.loads(path.with_suffix(".meta.json").read_text()) == {"step": 3, "epoch": 1, "file": "last.pt"}

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"step": 4, "w": torch.zeros(2)})
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 3  # the old checkpoint, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.meta.json", "last.pt"]  # no temp files left


def test_find_latest_takes_the_highest_step_and_skips_broken_entries(tmp_path):
    ck = tmp_path / "checkpoints"
    assert checkpoint.find_latest(tmp_path) is None
    checkpoint.save(ck / "a.pt", {"step": 10})
    checkpoint.save(ck / "b.pt", {"step": 30})
    checkpoint.save(ck / "c.pt", {"step": 20})
    (ck / "d.meta.json").write_text("{not json")
    (ck / "e.meta.json").write_text(json.dumps({"step": 99}))  # meta without its .pt
    assert checkpoint.find_latest(tmp_path) == ck / "b.pt"


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(checkpoint.CheckpointError, match=str(bad)):
        checkpoint.load(bad)
    assert checkpoint.load_on_all_ranks(None) is None


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    checkpoint.save(tmp_path / "r.pt", {"rng": checkpoint.rng_state()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_unwrap_reaches_the_bare_module():
    inner = nn.Linear(2, 2)
    assert checkpoint.unwrap(nn.DataParallel(nn.DataParallel(inner))) is inner
    assert checkpoint.unwrap(inner) is inner


def test_runlog_writes_nan_as_null(tmp_path):
    log = RunLog(tmp_path / "run", tensorboard=False)
    log.log({"epoch": 0, "split": "val", "dice": float("nan")})
    log.write_json("summary.json", {"best": float("inf")})
    log.close()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["dice"] is None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best"] is None


# ---------------------------------------------------------------- loop


def _fit(run_dir: Path, n_train: int = 64, dropout: float = 0.1, step=step_fn, **overrides):
    """Train a seeded ToyNet (torch.manual_seed(0), then ToyNet()) with `overrides` of a small SGD config."""
    torch.manual_seed(0)
    base = dict(
        run_dir=str(run_dir),
        epochs=2,
        batch_size_per_gpu=4,
        lr=0.05,
        lr_rule="none",
        warmup_epochs=0,
        optimizer="sgd",
        progress=False,
    )
    cfg = batching.resolve(TrainConfig(**{**base, **overrides}), 1)
    micro = cfg.accum * cfg.simulate_gpus
    model = ToyNet(dropout=dropout)
    train = data.train_loader(
        make_blobs(n_train, seed=1), cfg.batch_size_per_gpu, 2, micro_per_step=micro, simulate_gpus=cfg.simulate_gpus
    )
    val = data.eval_loader(make_blobs(12, seed=3), 4)
    summary = fit(Run(model, train, val, step, eval_fn, ToyMetric, monitor="accuracy", mode="max"), cfg)
    return summary, model


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


def test_fit_writes_the_run_folder_and_refuses_to_overwrite_it(tmp_path):
    summary, _ = _fit(tmp_path / "run")
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints", "tb"} <= {p.name for p in run.iterdir()}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in lines] == [(0, "train"), (0, "val"), (1, "train"), (1, "val")]
    assert summary["steps_per_epoch"] == 16 and summary["global_batch"] == 4 and not summary["preempted"]
    best = checkpoint.load(run / "checkpoints" / "best.pt")
    assert best["epoch"] == summary["best_epoch"] + 1 and best["config"]["epochs"] == 2
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 32
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        _fit(run)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_after_a_mid_epoch_preemption_gives_the_same_weights(tmp_path):
    _, straight = _fit(tmp_path / "a", epochs=3)
    stopped, _ = _fit(tmp_path / "b", epochs=3, preempt_at_step=21)  # mid-epoch 1 (16 steps per epoch)
    assert stopped["preempted"] and stopped["step"] == 21 and (tmp_path / "b" / "REQUEUE").is_file()
    resumed, model = _fit(tmp_path / "b", epochs=3, resume=True)
    assert not resumed["preempted"] and not (tmp_path / "b" / "REQUEUE").exists()
    assert torch.equal(_weights(model), _weights(straight))
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 0, 1, 1, 2, 2]  # no epoch logged twice


def test_preemption_on_an_epochs_last_step_finishes_the_epoch_first(tmp_path):
    out, _ = _fit(tmp_path / "r", epochs=3, preempt_at_step=16)
    assert out["preempted"] and out["epoch"] == 1
    last = checkpoint.load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert (last["epoch"], last["batch_in_epoch"], last["step"]) == (1, 0, 16)
    splits = [json.loads(x)["split"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert splits == ["train", "val"]  # the epoch was validated before stopping


def test_simulated_gpus_and_accumulation_equal_the_bigger_batch(tmp_path):
    # No dropout: each GPU and micro-batch draws its own masks (hvdtrain.seeding), unlike one batch of 8.
    _, big = _fit(tmp_path / "big", batch_size_per_gpu=8, epochs=1, dropout=0.0)
    sim, simulated = _fit(tmp_path / "sim", batch_size_per_gpu=4, simulate_gpus=2, epochs=1, dropout=0.0)
    _, accum = _fit(tmp_path / "acc", batch_size_per_gpu=4, accum=2, epochs=1, dropout=0.0)
    assert sim["gpus"] == 2 and sim["global_batch"] == 8 and sim["steps_per_epoch"] == 8
    assert torch.allclose(_weights(simulated), _weights(big), atol=1e-5)
    assert torch.allclose(_weights(accum), _weights(big), atol=1e-5)


def test_lr_rule_scales_by_gpus_times_accumulation(tmp_path):
    out, _ = _fit(tmp_path / "r", simulate_gpus=2, accum=2, lr_rule="sqrt", epochs=1)
    assert out["lr"] == pytest.approx(0.05 * 2)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["peak_lr"] == pytest.approx(0.1) and cfg["gpus"] == 2 and cfg["global_batch"] == 16


def test_gradient_clipping_bounds_the_step(tmp_path):
    def one_step(clip: float) -> float:
        torch.manual_seed(0)
        w0 = _weights(ToyNet())  # the weights _fit starts from
        _, model = _fit(
            tmp_path / f"c{clip}",
            n_train=8,  # one step of batch 8
            epochs=1,
            batch_size_per_gpu=8,
            lr=1.0,
            schedule="constant",
            momentum=0.0,
            weight_decay=0.0,
            clip_grad=clip,
        )
        return float((_weights(model) - w0).norm())

    assert one_step(1e-3) == pytest.approx(1e-3, rel=1e-3)  # SGD at lr 1: the step is the clipped gradient
    assert one_step(0.0) > 0.01


def test_a_nan_loss_stops_before_the_step(tmp_path):
    def nan_after_first(model, batch, device):
        loss, n = step_fn(model, batch, device)
        nan_after_first.calls += 1
        return (loss * float("nan") if nan_after_first.calls > 16 else loss), n

    nan_after_first.calls = 0
    torch.manual_seed(0)
    model = ToyNet()
    cfg = TrainConfig(run_dir=str(tmp_path / "r"), epochs=2, batch_size_per_gpu=4, progress=False)
    train = data.train_loader(make_blobs(64, seed=1), 4, seed=2)
    val = data.eval_loader(make_blobs(8, seed=3), 4)
    with pytest.raises(FloatingPointError, match="epoch 1, step 16"):
        fit(Run(model, train, val, nan_after_first, eval_fn, ToyMetric, monitor="accuracy"), cfg)
    assert torch.isfinite(_weights(model)).all()
    assert checkpoint.load(tmp_path / "r" / "checkpoints" / "last.pt")["step"] == 16


def test_an_unknown_plateau_monitor_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="'dice' is not a validation value"):
        _fit(tmp_path / "r", schedule="plateau", plateau_monitor="dice", epochs=1)


def test_evaluate_reduces_once_to_global_numbers():
    torch.manual_seed(0)
    model = ToyNet()
    out = evaluate(model, data.eval_loader(make_blobs(10, seed=3), 3), eval_fn, ToyMetric(), torch.device("cpu"))
    assert out["count"] == 10 and 0.0 <= out["accuracy"] <= 1.0 and out["loss"] > 0
    assert not model.training


def test_watchdog_names_a_rank_stopped_just_now_and_one_alive_elsewhere(tmp_path):
    """A fresh heartbeat that stops changing is a silent rank; one that keeps changing elsewhere is alive."""
    import json
    import threading
    import time

    from hvdtrain.atomic import write_text_atomic
    from hvdtrain.watchdog import Watchdog

    dog = Watchdog(timeout=2.0, rank=0, marker=tmp_path / "STALLED")  # period 0.2 s
    dog.beat("epoch 1, optimizer step 5")
    beats = tmp_path / ".heartbeat"
    beats.mkdir()

    def write(rank: int, where: str) -> None:
        beat = {"rank": rank, "host": "h", "pid": 100 + rank, "at": time.time(), "where": where, "idle_s": 0.0}
        write_text_atomic(beats / f"rank{rank}.json", json.dumps(beat))  # as the watchdog writes it

    write(1, "epoch 1, optimizer step 5")  # beat a moment ago, then stopped: no age threshold would flag it yet
    write(2, "evaluation")
    stop = threading.Event()

    def alive() -> None:
        while not stop.is_set():
            write(2, "evaluation")
            time.sleep(0.05)

    t = threading.Thread(target=alive)
    t.start()
    try:
        lines = dog.absent_ranks()
    finally:
        stop.set()
        t.join()
    assert len(lines) == 2
    assert lines[0].startswith("rank 1 (h pid 101): silent for") and "last at epoch 1, optimizer step 5" in lines[0]
    assert lines[1] == "rank 2 (h pid 102): alive but waiting at evaluation"


def test_watchdog_records_a_heartbeat_as_soon_as_it_starts(tmp_path):
    """A rank stopped before its first period ends is still on record (a fast toy epoch takes well under it)."""
    import json
    import time

    from hvdtrain import watchdog

    dog = watchdog.start(60.0, rank=1, marker=tmp_path / "STALLED")  # period 1 s
    try:
        end = time.monotonic() + 0.5
        path = tmp_path / ".heartbeat" / "rank1.json"
        while not path.is_file() and time.monotonic() < end:
            time.sleep(0.01)
        assert path.is_file() and json.loads(path.read_text())["rank"] == 1
        assert dog.period == 1.0
    finally:
        watchdog.stop()
