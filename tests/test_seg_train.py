"""jobs.train_unet under real `horovodrun -np 2`, then jobs.predict on its best checkpoint."""

from __future__ import annotations

import csv
import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import launch, run_cmd

pytestmark = pytest.mark.multirank

TINY = ["--config", "jobs/configs/unet_demo.yaml", "--epochs", "2", "--patch-size", "32", "32", "16",
        "--features", "4", "--depth", "2", "--samples-per-volume", "2", "--threads", "1", "--no-progress"]  # fmt: skip


def test_two_rank_training_then_prediction(tmp_path):
    data = tmp_path / "phantoms"
    run_cmd([sys.executable, "-m", "jobs.make_phantoms", str(data), "--preset", "demo", "--n-train", "4",
             "--n-val", "3", "--n-test", "1"])  # fmt: skip
    run = tmp_path / "run"
    p = launch(2, ["-m", "jobs.train_unet", *TINY, "--data", str(data), "--run-dir", str(run)], timeout=600)
    assert "checkpoint: mean Dice" in p.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in records] == [(0, "train"), (0, "val"), (1, "train"), (1, "val")]
    assert {r["world_size"] for r in records} == {2} and records[0]["global_batch"] == 2 * 2
    # 3 validation cases on 2 ranks (2 + 1): each scored exactly once, in one CSV written by rank 0.
    assert records[1]["cases"] == 3
    rows = list(csv.DictReader((run / "per_case_dice.csv").open()))
    assert len(rows) == 3 and len({r["case_id"] for r in rows}) == 3
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"]["features"] == 4
    out = tmp_path / "masks"
    run_cmd([sys.executable, "-m", "jobs.predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), str(data),
             "--split", "test", "--out", str(out), "--threads", "1"])  # fmt: skip
    (mask_path,) = out.glob("*_mask.nii.gz")
    image = nib.load(next((data / "imagesTs").glob("*.nii.gz")))
    mask = nib.load(mask_path)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
