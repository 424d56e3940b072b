"""Global-batch Dice and the Dice metric across 2 real ranks (jobs._launch); this file is also the worker.

python tests/test_seg_multirank.py OUT      # under horovodrun -np 2: each rank writes OUT/rank{r}.pt
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segmentation.losses import DiceLoss
from segmentation.metrics import DiceMetric

pytestmark = pytest.mark.multirank


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four samples of logits and targets; the third has an empty target."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 6, 5, 4, generator=g) * 2
    target = (torch.rand(4, 1, 6, 5, 4, generator=g) > 0.7).float()
    target[2] = 0
    return logits, target


def _masks(case: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case)
    gt = rng.random((5, 5, 5)) > (0.6 if case != 1 else 2.0)  # case 1: empty ground truth
    return rng.random((5, 5, 5)) > 0.6, gt


def worker(out: Path) -> None:
    from hvdtrain import dist

    d = dist.init(threads=1)
    logits, target = _batch()
    half = logits.shape[0] // d.size
    local = logits[d.rank * half : (d.rank + 1) * half].clone().requires_grad_()
    loss = DiceLoss("sigmoid", batch_dice=True, ce_weight=0.0, reduce_fn=dist.allreduce_sum_grad)(
        local, target[d.rank * half : (d.rank + 1) * half]
    )
    loss.backward()
    metric = DiceMetric()
    for case in range(d.rank, 5, d.size):  # as the evaluation sampler shards: 3 cases on rank 0, 2 on rank 1
        pred, gt = _masks(case)
        metric.update(f"case_{case}", pred, gt)
    torch.save(
        {"loss": loss.item(), "grad": local.grad, "metric": metric.compute(), "rows": metric.gather_rows()},
        out / f"rank{d.rank}.pt",
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from conftest import launch

    out = tmp_path_factory.mktemp("seg_multirank")
    launch(2, ["tests/test_seg_multirank.py", str(out)])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_global_batch_dice_equals_the_one_rank_loss(results):
    logits, target = _batch()
    full = logits.clone().requires_grad_()
    expected = DiceLoss("sigmoid", batch_dice=True)(full, target)
    expected.backward()
    for rank, r in enumerate(results):
        assert r["loss"] == pytest.approx(expected.item(), abs=1e-6)
        # Horovod's allreduce backward sums over ranks: each rank holds size x the global gradient of its
        # samples, which the optimizer's gradient averaging turns back into the one-rank gradient.
        torch.testing.assert_close(r["grad"], 2 * full.grad[rank * 2 : rank * 2 + 2], atol=1e-6, rtol=1e-5)


def _no_nan(rows: list[dict]) -> list[dict]:
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]


def test_dice_metric_reduced_once_over_ranks(results):
    reference = DiceMetric()
    for case in range(5):
        reference.update(f"case_{case}", *_masks(case))
    expected = reference.compute()
    assert expected["empty_cases"] == 1 and expected["scored_cases"] == 4
    for r in results:
        assert r["metric"] == pytest.approx(expected)
        assert [row["case_id"] for row in r["rows"]] == [f"case_{i}" for i in range(5)]
        assert _no_nan(r["rows"]) == _no_nan(reference.gather_rows())


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
