"""Real multi-rank behaviour under horovodrun (Gloo and MPI) and plain mpirun: nothing here is mocked."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import launch, run_cmd

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("backend", ["default", "gloo", "mpi", "mpirun"])
def test_collectives_and_exactly_once_evaluation(tmp_path, backend):
    launch(2, ["tests/hvd_worker.py", "collectives", str(tmp_path)], backend)
    results = [json.loads((tmp_path / f"collectives_{r}.json").read_text()) for r in (0, 1)]
    for rank, r in enumerate(results):
        assert (r["rank"], r["size"], r["local_size"]) == (rank, 2, 2)
        assert r["sum_int"] == 3 and isinstance(r["sum_int"], int)
        assert r["mean_float"] == pytest.approx(0.5)
        assert r["sum_tensor"] == [2.0, 1.0]
        assert r["broadcast"] == {"from": 0}
        assert r["gather"] == [0, 10]
        for n, ev in r["eval"].items():
            n = int(n)
            assert ev["all"] == list(range(n)), f"{n} samples on 2 ranks: each exactly once"
            assert ev["count"] == n and ev["index_sum"] == n * (n - 1) / 2


def _weights(path):
    return torch.load(path, weights_only=True)


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_rank")
    launch(2, ["tests/hvd_worker.py", "train", str(out), "--batch", "4"])  # the default launch (MPI)
    return out


def test_parameters_identical_on_every_rank(two_rank_run):
    w0, w1 = _weights(two_rank_run / "weights_rank0.pt"), _weights(two_rank_run / "weights_rank1.pt")
    _assert_close(w0, w1, atol=0)
    # And training moved them: compare with the initial weights of the same seed.
    from hvdtrain.testing import ToyNet

    torch.manual_seed(0)
    init = ToyNet(8, dropout=0.0).state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in init)


def test_two_ranks_batch_b_match_one_rank_batch_2b(two_rank_run, tmp_path):
    run_cmd(["python", "tests/hvd_worker.py", "train", str(tmp_path), "--batch", "8"])
    _assert_close(_weights(two_rank_run / "weights_rank0.pt"), _weights(tmp_path / "weights_rank0.pt"), atol=2e-5)


def test_simulated_two_gpus_match_real_two_ranks(two_rank_run, tmp_path):
    # One process, two accumulated micro-batches of 4 per step = the optimisation of 2 ranks x 4.
    run_cmd(["python", "tests/hvd_worker.py", "train", str(tmp_path), "--batch", "4", "--simulate-gpus", "2"])
    _assert_close(_weights(two_rank_run / "weights_rank0.pt"), _weights(tmp_path / "weights_rank0.pt"), atol=2e-5)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["gpus"], summary["global_batch"]) == (1, 2, 8)


def test_accumulation_under_horovod_matches_bigger_batch(two_rank_run, tmp_path):
    # 2 ranks x batch 2 x accumulation 2 (backward_passes_per_step=2) = 2 ranks x batch 4.
    launch(2, ["tests/hvd_worker.py", "train", str(tmp_path), "--batch", "2", "--accum", "2"], "mpi")
    # Under MPI as under Gloo: the replicas stay bit-identical.
    _assert_close(_weights(tmp_path / "weights_rank0.pt"), _weights(tmp_path / "weights_rank1.pt"), atol=0)
    _assert_close(_weights(two_rank_run / "weights_rank0.pt"), _weights(tmp_path / "weights_rank0.pt"), atol=2e-5)


def test_resume_after_preemption_gives_the_same_weights(tmp_path):
    demo = ["-m", "jobs.demo", "--epochs", "3", "--n-train", "256", "--n-val", "64", "--no-progress", "--threads", "1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch(2, [*demo, "--run-dir", str(full)])
    # 8 steps per epoch: preempt in the middle of the second epoch, then resume the requeued run.
    p = launch(2, [*demo, "--run-dir", str(cut), "--preempt-at-step", "12"])
    assert "REQUEUE written" in p.stdout
    assert (cut / "REQUEUE").is_file()
    meta = json.loads((cut / "checkpoints" / "last.meta.json").read_text())
    assert (meta["epoch"], meta["step"]) == (1, 12)
    launch(2, [*demo, "--run-dir", str(cut), "--resume"])
    assert not (cut / "REQUEUE").exists()
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (3, 24)
    _assert_close(a["model"], b["model"], atol=1e-6)
    epochs = [json.loads(line)["epoch"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 0, 1, 1, 2, 2], "each epoch logged once (train + val) across the preemption"


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    launch(2, ["tests/hvd_worker.py", "nan", str(tmp_path)], timeout=120)
    msgs = [(tmp_path / f"nan_rank{r}.txt").read_text() for r in (0, 1)]
    assert "step 3 on another rank" in msgs[0] and msgs[1].startswith("non-finite loss at epoch 0, step 3:")
    assert not (tmp_path / "run" / "checkpoints").exists(), "no checkpoint of diverged weights"


@pytest.fixture(scope="module")
def streams_run(tmp_path_factory):
    """2 real ranks, then 1 process simulating 2 GPUs, each one epoch on 16 copies of one image (hvd_worker streams)."""
    from PIL import Image

    out = tmp_path_factory.mktemp("streams")
    Image.fromarray(torch.arange(24 * 24 * 3, dtype=torch.uint8).reshape(24, 24, 3).numpy()).save(out / "same.png")
    launch(2, ["tests/hvd_worker.py", "streams", str(out)])
    run_cmd(["python", "tests/hvd_worker.py", "streams", str(out), "--simulate-gpus", "2"])
    load = lambda name: torch.load(out / name, weights_only=True)
    return [load(f"streams_sim1_rank{r}.pt") for r in (0, 1)], load("streams_sim2_rank0.pt")


def test_ranks_start_from_the_same_weights_but_draw_their_own_dropout_and_augmentation(streams_run):
    (r0, r1), _ = streams_run
    _assert_close(r0["init"], r1["init"], atol=0)  # the same seed builds the same model, before any broadcast
    assert len(r0["x"]) == len(r1["x"]) == 4  # 4 steps of 2 images per rank
    for step in range(4):
        # Every sample is the same image: what differs between the ranks' batches is their augmentation.
        assert not torch.equal(r0["x"][step], r1["x"][step])
        assert not torch.equal(r0["mask"][step], r1["mask"][step])
    assert 0.3 < torch.cat([m.float().flatten() for m in r0["mask"]]).mean() < 0.7  # dropout 0.5 did run


def test_simulated_gpus_draw_exactly_what_real_ranks_draw(streams_run):
    real, sim = streams_run
    assert len(sim["x"]) == 8  # 4 steps x 2 simulated GPUs; micro-batch 2 s + j is GPU j's
    for step in range(4):
        for j in (0, 1):
            assert torch.equal(sim["x"][2 * step + j], real[j]["x"][step])
            assert torch.equal(sim["mask"][2 * step + j], real[j]["mask"][step])
    # Same data, masks and initial weights per GPU: the same optimisation, with dropout on.
    _assert_close(real[0]["final"], sim["final"], atol=2e-5)


def test_sync_batch_norm_on_two_halves_equals_batch_norm_on_the_whole_batch(tmp_path):
    from hvd_worker import syncbn_case

    launch(2, ["tests/hvd_worker.py", "syncbn", str(tmp_path)])
    r0, r1 = (torch.load(tmp_path / f"syncbn_size2_rank{r}.pt", weights_only=True) for r in (0, 1))
    one = syncbn_case(0, 1)  # this process, no launcher: plain BatchNorm on the whole batch
    assert (r0["converted"], one["converted"]) == (2, 0)  # both BatchNorm layers on 2 ranks; a no-op on 1
    tol = {"atol": 1e-4, "rtol": 1e-4}  # float64 statistics on 2 ranks, float32 BatchNorm in one process
    for k in (0, 1):  # rank 0 held images 0-1, rank 1 images 2-5: the forward is the whole batch's
        torch.testing.assert_close(torch.cat([r0["y"][k], r1["y"][k]]), one["y"][k], **tol)
    torch.testing.assert_close(torch.cat([r0["eval"], r1["eval"]]), one["eval"], **tol)
    for r in (r0, r1):  # the same running statistics (and step counts) on both ranks as in one process
        _assert_close(r["state"], one["state"], atol=1e-5)
        for k, g in one["grads"].items():  # the backward reduces the statistics' gradients too
            torch.testing.assert_close(r["grads"][k], g, **tol, msg=lambda m, k=k: f"{k}: {m}")
