"""The pieces the training job passes to hvdtrain.fit, run for one short epoch on tiny phantoms (one rank)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hvdtrain import Run, data, dist, fit
from segmentation.config import UNetConfig
from segmentation.engine import (
    build_model,
    case_group,
    checkpoint_config,
    make_eval_fn,
    make_loss,
    make_step_fn,
    model_from_checkpoint,
    model_kwargs,
    patch_dataset,
    prepare_data,
    split_cases,
)
from segmentation.io import Case
from segmentation.metrics import DiceMetric
from segmentation.phantoms import PhantomSpec, write_decathlon
from segmentation.sampling import VolumeDataset

SPEC = PhantomSpec(shape=(32, 32, 16), spacing=(2.0, 2.0, 2.5), diameter_mm=(8.0, 12.0), nodules=(1, 1))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    write_decathlon(root, n_train=4, n_val=2, n_test=0, seed=0, spec=SPEC)
    return root


def test_split_uses_validation_list_or_a_seeded_split(dataset, tmp_path):
    train, val = split_cases(dataset)
    assert len(train) == 4 and [c.case_id for c in val] == ["phantom_004", "phantom_005"]
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(5):
        for sub in ("images", "labels"):
            (tmp_path / sub / f"c{i}.nii.gz").symlink_to(dataset / "imagesTr" / "phantom_000.nii.gz")
    tr, va = split_cases(tmp_path, val_fraction=0.4, seed=1)
    assert len(tr) == 3 and len(va) == 2 and not {c.case_id for c in tr} & {c.case_id for c in va}
    assert split_cases(tmp_path, 0.4, 1) == (tr, va)
    assert all(isinstance(c, Case) for c in tr)


def test_one_epoch_through_fit_and_prediction(dataset, tmp_path):
    cfg = UNetConfig(
        data=str(dataset),
        cache_dir=str(tmp_path / "cache"),
        run_dir=str(tmp_path / "run"),
        epochs=1,
        batch_size_per_gpu=2,
        patch_size=(16, 16, 8),
        samples_per_volume=2,
        features=4,
        depth=2,
        deep_supervision=True,
        warmup_epochs=0.0,
        progress=False,
        threads=1,
        amp="off",
    )
    dist.init(threads=1)  # as the job does; keeps this process at one thread
    torch.manual_seed(0)
    train_cases, val_cases = prepare_data(cfg, progress=False)
    assert len(train_cases) == 4 and len(val_cases) == 2
    ds = patch_dataset(cfg, train_cases)
    loss_fn = make_loss(cfg)
    step_fn = make_step_fn(loss_fn)
    model = build_model(model_kwargs(cfg))
    loss, n = step_fn(model, next(iter(torch.utils.data.DataLoader(ds, batch_size=2))), torch.device("cpu"))
    assert n == 2 and loss.ndim == 0 and math.isfinite(loss.item())

    run = Run(
        model,
        data.train_loader(ds, cfg.batch_size_per_gpu, cfg.seed),
        data.eval_loader(VolumeDataset(val_cases), 1),
        step_fn,
        make_eval_fn(cfg),
        DiceMetric,
        checkpoint_config(cfg),
        monitor="dice",
    )
    summary = fit(run, cfg)
    final = summary["final"]
    assert final["cases"] == 2 and 0.0 <= final["dice"] <= 1.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["features"] == 4 and saved["preprocess"]["window"] == [-1000.0, 400.0]
    pred = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert pred.roi_size == (16, 16, 8) and not pred.model.training

    metric = DiceMetric()
    image, label, case_id = VolumeDataset(val_cases)[0]
    make_eval_fn(cfg)(pred.model, (image[None], label[None], [case_id]), torch.device("cpu"), metric)
    assert metric.rows[0]["case_id"] == case_id and metric.rows[0]["gt_voxels"] == int(np.asarray(label).sum())


@pytest.mark.parametrize("preset", ["unet_lung.yaml", "unet_demo.yaml"])
def test_presets_parse(root, preset):
    from hvdtrain.config import parse_config

    cfg = parse_config(UNetConfig, ["--config", str(root / "jobs" / "configs" / preset)])
    assert len(cfg.patch_size) == 3 and all(p % 2**cfg.depth == 0 for p in cfg.patch_size)
    assert checkpoint_config(cfg)["model"]["depth"] == cfg.depth


def test_grouped_split_keeps_each_patient_on_one_side(dataset, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    names = [f"LIDC-IDRI-{p:04d}_R_{n}" for p in range(6) for n in range(1 + p % 3)]
    for name in names:
        for sub in ("images", "labels"):
            (tmp_path / sub / f"{name}.nii.gz").symlink_to(dataset / "imagesTr" / "phantom_000.nii.gz")
    pattern = r"^(LIDC-IDRI-\d+)_R_"
    for seed in range(5):
        tr, va = split_cases(tmp_path, val_fraction=0.3, seed=seed, group=pattern)
        patients = [{case_group(c.case_id, pattern) for c in side} for side in (tr, va)]
        assert patients[0] and patients[1] and not patients[0] & patients[1]
        assert len(tr) + len(va) == len(names)
    ungrouped = split_cases(tmp_path, 0.3, 0, group=r"^(LIDC-IDRI-\d+)_R_(\d+)")  # first capture: still the patient
    assert {case_group(c.case_id, pattern) for c in ungrouped[0]}.isdisjoint(
        {case_group(c.case_id, pattern) for c in ungrouped[1]}
    )
    with pytest.raises(ValueError, match="does not match case"):
        split_cases(tmp_path, 0.3, 0, group=r"^patient-(\d+)")
