"""Prediction on NIfTI: preprocessing undone exactly (orientation, spacing), masks keep the input's geometry."""

from __future__ import annotations

import csv
import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from jobs import predict
from segmentation.config import UNetConfig
from segmentation.engine import (
    Predictor,
    build_model,
    checkpoint_config,
    model_from_checkpoint,
    model_kwargs,
    split_cases,
)
from segmentation.phantoms import PhantomSpec, write_decathlon
from segmentation.preprocess import PreprocessParams

SPEC = PhantomSpec(shape=(40, 36, 20), spacing=(1.5, 1.5, 2.5), diameter_mm=(8.0, 12.0), nodules=(1, 1))


class Threshold(nn.Module):
    """A 'model' marking voxels above a normalised intensity: its mask is known on the original grid."""

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 200.0 * (x - self.level)


def _hu_to_unit(hu: float) -> float:
    return (hu + 1000.0) / 1400.0


def test_geometry_is_undone_exactly_without_resampling(tmp_path):
    write_decathlon(tmp_path / "ph", 1, 0, 0, seed=0, spec=SPEC)
    src = nib.load(str(tmp_path / "ph" / "imagesTr" / "phantom_000.nii.gz"))
    hu = np.asanyarray(src.dataobj)
    pred = Predictor(Threshold(_hu_to_unit(-300.5)), PreprocessParams(), (16, 16, 16), overlap=0.5)
    _, mask = pred.predict_file(tmp_path / "ph" / "imagesTr" / "phantom_000.nii.gz")
    assert np.array_equal(mask, (hu > -300.5).astype(np.uint8))  # LAS input: flipped and flipped back


def test_geometry_with_resampling_is_close(tmp_path):
    write_decathlon(tmp_path / "ph", 1, 0, 0, seed=0, spec=SPEC)
    src = nib.load(str(tmp_path / "ph" / "imagesTr" / "phantom_000.nii.gz"))
    truth = np.asanyarray(src.dataobj) > -300
    params = PreprocessParams(target_spacing=(1.0, 2.0, 1.5))
    pred = Predictor(Threshold(_hu_to_unit(-300)), params, (16, 16, 16), overlap=0.25)
    _, mask = pred.predict_file(tmp_path / "ph" / "imagesTr" / "phantom_000.nii.gz")
    dice = 2 * (truth & (mask > 0)).sum() / (truth.sum() + mask.sum())
    assert mask.shape == truth.shape and dice > 0.95


def test_predict_job_writes_masks_with_input_geometry(tmp_path, capsys):
    write_decathlon(tmp_path / "ph", 1, 1, 1, seed=0, spec=SPEC)
    cfg = UNetConfig(features=4, depth=2, patch_size=(16, 16, 16), target_spacing=(2.0, 2.0, 2.5))
    torch.manual_seed(0)
    model = build_model(model_kwargs(cfg))
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": checkpoint_config(cfg)}, ckpt)
    written = predict.main(["--checkpoint", str(ckpt), str(tmp_path / "ph"), "--out", str(tmp_path / "pred")])
    assert [p.name for p in written] == ["phantom_002_mask.nii.gz"]
    src = nib.load(str(tmp_path / "ph" / "imagesTs" / "phantom_002.nii.gz"))
    out = nib.load(str(written[0]))
    assert out.shape == src.shape and np.allclose(out.affine, src.affine) and out.get_data_dtype() == np.uint8
    assert out.header.get_xyzt_units() == src.header.get_xyzt_units()
    # A validation list with labels: Dice is printed and written.
    predict.main(
        [
            "--checkpoint",
            str(ckpt),
            str(tmp_path / "ph"),
            "--out",
            str(tmp_path / "v"),
            "--split",
            "val",
            "--suffix",
            "",
            "--overlap",
            "0.25",
        ]
    )
    assert (tmp_path / "v" / "phantom_001.nii.gz").is_file() and (tmp_path / "v" / "dice.csv").is_file()
    assert "mean Dice" in capsys.readouterr().out
    # A single file.
    single = predict.main(
        [
            "--checkpoint",
            str(ckpt),
            str(tmp_path / "ph" / "imagesTs" / "phantom_002.nii.gz"),
            "--out",
            str(tmp_path / "one"),
        ]
    )
    assert single[0].is_file()


def test_predict_applies_the_checkpoints_post_processing_or_the_override(tmp_path):
    from scipy import ndimage

    write_decathlon(tmp_path / "ph", 1, 1, 1, seed=0, spec=SPEC)
    image = str(tmp_path / "ph" / "imagesTs" / "phantom_002.nii.gz")
    cfg = UNetConfig(features=4, depth=2, patch_size=(16, 16, 16), postprocess="center_component")
    torch.manual_seed(3)
    model = build_model(model_kwargs(cfg))
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": checkpoint_config(cfg)}, ckpt)
    img = nib.load(image)
    prob = model_from_checkpoint(ckpt).probabilities(np.asarray(img.dataobj), img.affine)
    # The untrained net's top 10% of voxels are scattered: several components without the post-processing.
    cfg = dataclasses.replace(cfg, threshold=float(np.quantile(prob, 0.9)))
    torch.save({"model": model.state_dict(), "config": checkpoint_config(cfg)}, ckpt)

    def mask(*extra):
        out = predict.main(["--checkpoint", str(ckpt), image, "--out", str(tmp_path / str(len(extra))), *extra])
        return np.asarray(nib.load(str(out[0])).dataobj).astype(bool)

    raw, post = mask("--postprocess", "none"), mask()
    n_raw = ndimage.label(raw, structure=np.ones((3, 3, 3)))[1]
    n_post = ndimage.label(post, structure=np.ones((3, 3, 3)))[1]
    assert n_raw > 1 and n_post == 1 and post.sum() < raw.sum() and not (post & ~raw).any()


def test_predict_heldout_scores_exactly_the_cases_the_run_held_out(tmp_path, capsys):
    write_decathlon(tmp_path / "ph", 6, 0, 0, seed=1, spec=SPEC)  # no validation list: the run draws its own split
    cfg = UNetConfig(features=4, depth=2, patch_size=(16, 16, 16), val_fraction=0.34, split_seed=5)
    torch.manual_seed(0)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": build_model(model_kwargs(cfg)).state_dict(), "config": checkpoint_config(cfg)}, ckpt)
    args = ["--checkpoint", str(ckpt), str(tmp_path / "ph"), "--out", str(tmp_path / "h"), "--split", "heldout"]
    predict.main(args)
    with open(tmp_path / "h" / "dice.csv") as f:
        scored = sorted(r["case_id"] for r in csv.DictReader(f))
    held = sorted(c.case_id for c in split_cases(tmp_path / "ph", 0.34, 5)[1])
    train = {c.case_id for c in split_cases(tmp_path / "ph", 0.34, 5)[0]}
    assert scored == held and len(held) == 2 and not train & set(scored)
    assert held != sorted(c.case_id for c in split_cases(tmp_path / "ph", 0.34, 6)[1])  # the seed matters
    # A checkpoint without split settings: a one-line error and exit status 2, nothing written.
    config = {k: v for k, v in checkpoint_config(cfg).items() if k != "val_fraction"}
    torch.save({"model": build_model(model_kwargs(cfg)).state_dict(), "config": config}, ckpt)
    assert predict.cli([*args[:4], str(tmp_path / "h2"), "--split", "heldout"]) == 2
    assert "no split settings" in capsys.readouterr().err
    assert not list((tmp_path / "h2").glob("*.nii.gz"))


def test_predict_tta_and_threshold_flags_override_the_checkpoint(tmp_path):
    write_decathlon(tmp_path / "ph", 1, 1, 1, seed=0, spec=SPEC)
    image = str(tmp_path / "ph" / "imagesTs" / "phantom_002.nii.gz")
    cfg = UNetConfig(features=4, depth=2, patch_size=(16, 16, 16))
    torch.manual_seed(4)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": build_model(model_kwargs(cfg)).state_dict(), "config": checkpoint_config(cfg)}, ckpt)
    img = nib.load(image)
    pred = model_from_checkpoint(ckpt)
    plain = pred.probabilities(np.asarray(img.dataobj), img.affine)
    pred.tta_flips = (0, 1, 2)
    flipped = pred.probabilities(np.asarray(img.dataobj), img.affine)
    level = float(np.median(flipped))  # a threshold that splits the volume, so the masks can differ

    def mask(*extra):
        out = predict.main(["--checkpoint", str(ckpt), image, "--out", str(tmp_path / "-".join(extra)), *extra])
        return np.asarray(nib.load(str(out[0])).dataobj).astype(bool)

    with_tta = mask("--tta", "--threshold", str(level))
    assert np.array_equal(with_tta, flipped > level)
    assert np.array_equal(mask("--no-tta", "--threshold", str(level)), plain > level)
    assert not np.array_equal(with_tta, plain > level)  # the untrained net is not mirror-symmetric
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(ckpt), image, "--out", str(tmp_path / "bad"), "--threshold", "1.5"])
    assert e.value.code == 2


def test_predict_names_a_checkpoint_that_is_not_a_unet(tmp_path, capsys):
    write_decathlon(tmp_path / "ph", 1, 0, 1, seed=0, spec=SPEC)
    ckpt = tmp_path / "classifier.pt"
    torch.save({"model": {}, "config": {"model": "resnet18", "epochs": 3}}, ckpt)  # a classifier run's config
    out = tmp_path / "out"
    assert predict.cli(["--checkpoint", str(ckpt), str(tmp_path / "ph"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "not a U-Net checkpoint" in err
    assert not list(out.glob("*.nii.gz"))
