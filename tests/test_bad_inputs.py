"""The bad-input matrix: NIfTI, PNG, YAML, CSV manifests, splits.json and checkpoints.

Every case is a named error whose message says what and where; the job entry points (run as subprocesses where
that is cheap) exit non-zero, and an earlier run folder is left byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from classification.data import DataError as ClsDataError
from classification.data import ImageReadError, PixelValueError, load_rgb, read_manifest, scan_folder
from classification.splits import load_splits
from hvdtrain import resume
from hvdtrain.checkpoint import CheckpointError
from hvdtrain.testing import ToyNet
from jobs import demo
from segmentation.config import UNetConfig
from segmentation.engine import build_model, checkpoint_config, model_kwargs
from segmentation.io import Case, CaseMismatchError, LabelValueError, NiftiReadError, load_pair, read_nifti
from segmentation.preprocess import PreprocessParams, preprocess_dataset
from segmentation.validate import (
    EmptyLabelError,
    GeometryError,
    NonFiniteError,
    check_affine,
    check_label_not_empty,
    check_volume,
)

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
DEMO = ["--epochs", "1", "--n-train", "32", "--n-val", "8", "--width", "4", "--no-progress", "--threads", "1"]


def _run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _nii(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def _volume(shape=(9, 8, 7)) -> np.ndarray:
    return np.random.default_rng(0).normal(-500, 200, shape).astype(np.float32)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A finished one-epoch demo run: the 'earlier run' every job below must leave untouched."""
    run = tmp_path_factory.mktemp("earlier") / "run"
    p = _run(["-m", "jobs.demo", "--run-dir", str(run), *DEMO])
    assert p.returncode == 0, p.stderr[-2000:]
    return run


@pytest.fixture
def run_copy(run_folder, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    return copy


# ---- NIfTI volumes ------------------------------------------------------------------------------------------------
def test_nan_voxel_names_file_and_index(tmp_path):
    vol = _volume()
    vol[3, 2, 1] = np.nan
    path = _nii(tmp_path / "ct.nii.gz", vol)
    _, data = read_nifti(path)
    with pytest.raises(NonFiniteError, match=r"ct\.nii\.gz has 1 non-finite voxel.*index \(3, 2, 1\)"):
        check_volume(data, AFFINE, path)


def test_inf_voxel(tmp_path):
    vol = _volume()
    vol[0, 0, 5] = np.inf
    with pytest.raises(NonFiniteError, match=r"inf at voxel index \(0, 0, 5\)"):
        check_volume(vol, AFFINE, tmp_path / "x.nii.gz")


@pytest.mark.parametrize(
    "affine, message",
    [
        (np.diag([0.8, 0.0, 2.5, 1.0]), "zero, negative or non-finite axis 1"),
        (np.diag([0.8, 0.8, 1000.0, 1.0]), "1000 mm on axis 2 is outside"),
        (np.diag([0.8, 1e-5, 2.5, 1.0]), "1e-05 mm on axis 1 is outside"),
        (np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]]), "not invertible"),
        (np.diag([0.8, np.nan, 2.5, 1.0]), "finite 4x4"),
    ],
    ids=["zero-spacing", "absurd-spacing", "micron-spacing", "singular-affine", "nan-affine"],
)
def test_bad_geometry(tmp_path, affine, message):
    with pytest.raises(GeometryError, match=message):
        check_affine(affine, tmp_path / "ct.nii.gz")


def test_empty_label_where_required(tmp_path):
    with pytest.raises(EmptyLabelError, match="lab.nii.gz has no foreground"):
        check_label_not_empty(np.zeros((4, 4, 4), np.uint8), tmp_path / "lab.nii.gz")


def test_truncated_nifti(tmp_path):
    path = _nii(tmp_path / "ct.nii.gz", _volume((30, 30, 30)))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(NiftiReadError, match="cannot read NIfTI file .*ct.nii.gz"):
        read_nifti(path)


def test_label_values_and_shape(tmp_path):
    image = _nii(tmp_path / "img.nii.gz", _volume())
    lab = np.zeros((9, 8, 7), np.uint8)
    lab[1, 1, 1] = 2
    with pytest.raises(LabelValueError, match="found values \\[2\\]"):
        load_pair(Case("c", image, _nii(tmp_path / "lab2.nii.gz", lab)))
    with pytest.raises(CaseMismatchError, match="has shape \\(9, 8, 6\\)"):
        load_pair(Case("c", image, _nii(tmp_path / "lab3.nii.gz", np.zeros((9, 8, 6), np.uint8))))


def test_preprocessing_refuses_nan_and_caches_nothing(tmp_path):
    vol = _volume()
    vol[4, 4, 4] = np.nan
    case = Case(
        "bad", _nii(tmp_path / "bad.nii.gz", vol), _nii(tmp_path / "bad_lab.nii.gz", np.zeros((9, 8, 7), np.uint8))
    )
    with pytest.raises(NonFiniteError, match=r"bad\.nii\.gz .*\(4, 4, 4\)"):
        preprocess_dataset([case], tmp_path / "cache", PreprocessParams())
    assert not list((tmp_path / "cache").rglob("*.npy")) and not list((tmp_path / "cache").rglob("bad.*.json"))


def test_preprocessing_refuses_zero_spacing(tmp_path):
    header = nib.Nifti1Header()
    header.set_sform(AFFINE, code=1)
    header["srow_z"] = [0, 0, 0, 0]  # a converter's broken sform: zero slice spacing (nibabel won't build it)
    nib.save(nib.Nifti1Image(_volume(), None, header=header), str(tmp_path / "flat.nii.gz"))
    case = Case("flat", tmp_path / "flat.nii.gz")
    with pytest.raises(GeometryError, match="flat.nii.gz"):
        preprocess_dataset([case], tmp_path / "cache", PreprocessParams())


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory) -> Path:
    cfg = UNetConfig(features=4, depth=2, patch_size=(16, 16, 16), target_spacing=(2.0, 2.0, 2.5))
    path = tmp_path_factory.mktemp("unet") / "best.pt"
    torch.save({"model": build_model(model_kwargs(cfg)).state_dict(), "config": checkpoint_config(cfg)}, path)
    return path


@pytest.mark.parametrize("what", ["nan-label", "label-shape"])
def test_predict_validates_labels_like_training(tmp_path, unet_ckpt, what):
    data = tmp_path / "data"
    _nii(data / "images" / "c1.nii.gz", _volume((20, 20, 8)))
    lab = np.zeros((20, 20, 8) if what == "nan-label" else (20, 20, 7), np.float32)
    if what == "nan-label":
        lab[2, 3, 4] = np.nan
    _nii(data / "labels" / "c1.nii.gz", lab)
    p = _run(["-m", "jobs.predict", "--checkpoint", str(unet_ckpt), str(data), "--out", str(tmp_path / "out")])
    assert p.returncode == 2  # jobs.predict prints the named error without a traceback
    expected = (
        r"error: label .*c1.nii.gz has 1 non-finite voxel.*\(2, 3, 4\)"
        if what == "nan-label"
        else r"error: label .*c1.nii.gz has shape \(20, 20, 7\) but image .*c1.nii.gz has \(20, 20, 8\)"
    )
    assert re.search(expected, p.stderr), p.stderr[-1500:]
    assert not list((tmp_path / "out").glob("*.nii.gz"))  # no mask written before the check


def test_predict_rejects_nan_image(tmp_path, unet_ckpt):
    vol = _volume((20, 20, 8))
    vol[5, 6, 7] = np.nan
    _nii(tmp_path / "c2.nii.gz", vol)
    p = _run(
        ["-m", "jobs.predict", "--checkpoint", str(unet_ckpt), str(tmp_path / "c2.nii.gz"), "--out", str(tmp_path)]
    )
    assert p.returncode == 2 and re.search(r"error: image .*c2.nii.gz has 1 non-finite voxel.*\(5, 6, 7\)", p.stderr)


# ---- PNG images ---------------------------------------------------------------------------------------------------
def test_truncated_png(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cannot read image .*a.png"):
        load_rgb(path)


def test_text_file_named_png(tmp_path):
    (tmp_path / "b.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="b.png"):
        load_rgb(tmp_path / "b.png")


def test_float_image_with_nan_pixel(tmp_path):
    a = np.ones((6, 5), np.float32)
    a[4, 2] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "c.tif")
    with pytest.raises(PixelValueError, match="c.tif has 1 non-finite pixel.*row 4 col 2"):
        load_rgb(tmp_path / "c.tif")


def test_mask_without_image_and_single_class(tmp_path):
    for cls in ("benign", "malignant"):
        (tmp_path / cls).mkdir()
        Image.new("L", (20, 20), 90).save(tmp_path / cls / "x (1).png")
    Image.new("L", (20, 20), 0).save(tmp_path / "benign" / "gone_mask.png")
    with pytest.raises(ClsDataError, match="gone_mask.png has no image gone"):
        scan_folder(tmp_path)
    shutil.rmtree(tmp_path / "malignant")
    (tmp_path / "benign" / "gone_mask.png").unlink()
    with pytest.raises(ClsDataError, match="1 class folder"):
        scan_folder(tmp_path)


# ---- CSV manifests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, error, message",
    [
        ("file,class\na.png,benign\n", ClsDataError, "needs a header with columns path,label"),
        ("path,label\n,benign\nb.png,malignant\n", ClsDataError, "line 2: empty path or label"),
        ("path,label\nmissing.png,benign\nb.png,malignant\n", FileNotFoundError, "missing.png does not exist"),
        ("path,label\na.png,benign\nb.png,benign\n", ClsDataError, "1 class"),
        ("path,label\na_mask.png,benign\nb.png,malignant\n", ClsDataError, "lists the mask"),
        ("path,label\n", ClsDataError, "has no rows"),
    ],
    ids=["bad-header", "empty-path", "missing-file", "one-class", "lists-mask", "no-rows"],
)
def test_bad_manifest(tmp_path, text, error, message):
    for name in ("a.png", "b.png", "a_mask.png"):
        Image.new("L", (20, 20), 80).save(tmp_path / name)
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(error, match=message):
        read_manifest(tmp_path / "m.csv")


# ---- YAML presets (the job exits 2 before touching anything) ------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: [1\n", "is not valid YAML"),
        ("- epochs\n- 3\n", "must hold a mapping"),
        ("epochz: 3\n", "unknown field\\(s\\) epochz"),
        ("optimizer: adam\n", "optimizer='adam' is not one of"),
    ],
    ids=["syntax", "list", "unknown-key", "bad-choice"],
)
def test_bad_yaml(tmp_path, run_copy, capsys, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    before = _hashes(run_copy)
    with pytest.raises(SystemExit) as exit_info:  # the job's own main(), in this process: it stops while parsing
        demo.main(["--config", str(tmp_path / "bad.yaml"), "--run-dir", str(run_copy), "--resume"])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert _hashes(run_copy) == before


# ---- splits.json --------------------------------------------------------------------------------------------------
def _splits(tmp_path: Path, **change) -> Path:
    data = {
        "format": "classification-splits/1",
        "class_names": ["a", "b"],
        "n_splits": 2,
        "seed": 0,
        "test_fraction": 0.0,
        "dedup_threshold": 6,
        "samples": [
            {"path": f"{c}/{i}.png", "label": k, "group": 2 * k + i} for k, c in enumerate("ab") for i in (0, 1)
        ],
        "test": [],
        "folds": [{"train": [0, 2], "val": [1, 3]}, {"train": [1, 3], "val": [0, 2]}],
        **change,
    }
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(data) if change.get("format") != "raw" else "{not json")
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "raw"}, "is not a classification-splits/1 file"),
        ({"format": "something-else/2"}, "is not a classification-splits/1 file"),
        ({"folds": [{"train": [0, 9], "val": [1]}]}, "refers to sample 9, but it lists 4 samples"),
        ({"samples": [{"path": "a/0.png"}]}, "is not a classification-splits/1 file"),
    ],
    ids=["not-json", "wrong-format", "index-out-of-range", "sample-without-label"],
)
def test_bad_splits_file(tmp_path, change, message):
    with pytest.raises(ClsDataError, match=message):
        load_splits(_splits(tmp_path, **change))


# ---- checkpoints --------------------------------------------------------------------------------------------------
def test_truncated_checkpoint_on_resume(run_copy):
    last = run_copy / "checkpoints" / "last.pt"
    best = run_copy / "checkpoints" / "best.pt"
    for ckpt in (last, best):
        ckpt.write_bytes(ckpt.read_bytes()[:500])
    before = _hashes(run_copy)
    p = _run(["-m", "jobs.demo", "--run-dir", str(run_copy), "--resume", *DEMO])
    assert p.returncode != 0 and "CheckpointError: cannot load checkpoint" in p.stderr, p.stderr[-1500:]
    assert _hashes(run_copy) == before


def test_resume_into_another_model(run_copy):
    before = _hashes(run_copy)
    p = _run(["-m", "jobs.demo", "--run-dir", str(run_copy), "--resume", *DEMO, "--width", "8"])
    assert p.returncode != 0
    assert "ResumeMismatchError" in p.stderr and "width: checkpoint 4, now 8" in p.stderr, p.stderr[-1500:]
    assert _hashes(run_copy) == before


def test_fresh_run_into_a_used_folder(run_copy):
    before = _hashes(run_copy)
    p = _run(["-m", "jobs.demo", "--run-dir", str(run_copy), *DEMO])
    assert p.returncode != 0 and "already holds checkpoints: pass --resume" in p.stderr
    assert _hashes(run_copy) == before


def test_checkpoint_weights_that_do_not_fit():
    saved = ToyNet(4).state_dict()
    saved.pop("head.2.bias")
    with pytest.raises(resume.ResumeMismatchError, match=r"missing \(1\): head.2.bias; shape checkpoint -> model"):
        resume.check_model(saved, ToyNet(8), "ck.pt")


def test_changed_task_lists_every_key_but_allows_schedule_changes():
    old = {"model": "resnet18", "classes": ["a", "b"], "epochs": 5, "lr": 0.1, "world_size": 2}
    new = {"model": "resnet34", "classes": ["a", "b", "c"], "epochs": 9, "lr": 0.05, "world_size": 4}
    with pytest.raises(resume.ResumeMismatchError, match="differs in classes, model"):
        resume.config_changes(old, new, "ck.pt")
    assert resume.config_changes({**old, "model": "x"}, {**old, "model": "x", "lr": 0.05}, "c") == ["lr: 0.1 -> 0.05"]


def test_predict_with_a_file_that_is_no_checkpoint(tmp_path):
    (tmp_path / "best.pt").write_text("not a checkpoint")
    p = _run(["-m", "jobs.predict", "--checkpoint", str(tmp_path / "best.pt"), str(tmp_path), "--out", str(tmp_path)])
    assert p.returncode == 2 and f"cannot load checkpoint {tmp_path / 'best.pt'}" in p.stderr
    assert "Traceback" not in p.stderr  # one line naming the file, not a stack


def test_world_size_change_remaps_the_position():
    # 2 ranks had trained 6 micro-batches each (12 of the global order); at 4 ranks that is 3 each, step 3 + epoch.
    assert resume.remap_position(6, 2, 4, 1, 10, epoch=2) == (
        3,
        23,
        "epoch 2 continues after 12 micro-batches (3 per rank)",
    )
    batch, step, note = resume.remap_position(5, 2, 4, 1, 10, epoch=2)  # 10 micro-batches: not whole at 4 ranks
    assert (batch, step) == (0, 20) and "restarts" in note
    assert resume.remap_position(5, 2, 2, 1, 10, epoch=2) == (5, None, "")
    with pytest.raises(CheckpointError):  # the typed error a job reports
        raise resume.ResumeMismatchError("x")
