"""Real chest CTs in NRRD (3D Slicer's files in the pyradiomics 3.1.0 sources): labels overlay in world coordinates,
the lung mask keeps the lesion and drops the body, `jobs.predict` runs end to end on the input's grid."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from jobs import predict
from segmentation.config import UNetConfig
from segmentation.engine import build_model, checkpoint_config, model_kwargs
from segmentation.io import CaseMismatchError, read_image, write_mask
from segmentation.lungmask import axial_axis, lung_mask
from segmentation.phantoms import PhantomSpec, make_phantom
from segmentation.preprocess import spacing_of

# The sdist's own metadata says 3.0.1a1 (versioneer without git), so `pip download pyradiomics==3.1.0` rejects it
# (and `--no-binary :all:` also compiles numpy for the build environment): ask pip for the file itself, by hash.
SDIST = (
    "https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/"
    "pyradiomics-3.1.0.tar.gz#sha256=24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4"
)
NAMES = ("lung1_image.nrrd", "lung1_label.nrrd", "lung2_image.nrrd", "lung2_label.nrrd")


def _fetch(cache: Path) -> Path:
    """`cache/data/` with the four NRRD files, downloaded and extracted once."""
    data = cache / "data"
    if all((data / n).is_file() for n in NAMES):
        return data
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pyradiomics", "-d", str(cache)]
    proc = subprocess.run([*cmd, f"pyradiomics @ {SDIST}"], capture_output=True, text=True, timeout=600)
    sdist = cache / "pyradiomics-3.1.0.tar.gz"
    if not sdist.is_file():
        pytest.fail(f"could not download the pyradiomics 3.1.0 sources into {cache} (offline?):\n{proc.stderr[-2000:]}")
    tmp = Path(tempfile.mkdtemp(dir=cache))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if Path(m.name).name in NAMES and Path(m.name).parent.name == "data"]
        tar.extractall(tmp, members=members, filter="data")
    data.mkdir(exist_ok=True)
    for m in members:
        os.replace(tmp / m.name, data / Path(m.name).name)
    return data


@pytest.fixture(scope="module")
def radiomics_data() -> Path:
    root = Path(os.environ.get("HVDTRAIN_CACHE", Path.home() / ".cache" / "hvdtrain")) / "pyradiomics"
    return _fetch(root)


@pytest.fixture(scope="module")
def lung1(radiomics_data):
    """(image, HU, label, lung mask) of lung1, computed once for the tests below."""
    img, hu = read_image(radiomics_data / "lung1_image.nrrd")
    _, label = read_image(radiomics_data / "lung1_label.nrrd")
    return img, hu, label, lung_mask(hu, spacing_of(img.affine), axial_axis(img.affine))


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_label_written_back_overlays_the_lesion_in_world_coordinates(radiomics_data, tmp_path, case):
    img, hu = read_image(radiomics_data / f"{case}_image.nrrd")
    lab_img, label = read_image(radiomics_data / f"{case}_label.nrrd")
    assert hu.dtype == np.int16 and label.shape == hu.shape and np.allclose(lab_img.affine, img.affine)
    for name in (f"{case}.nii.gz", f"{case}.nrrd"):
        out = write_mask((label > 0).astype(np.uint8), img, tmp_path / name)
        # Independent check with SimpleITK: the lesion's world centroid in the written file equals the source's.
        src, back = sitk.ReadImage(str(radiomics_data / f"{case}_label.nrrd")), sitk.ReadImage(str(out))
        centroids = []
        for im in (src, back):
            idx = np.argwhere(sitk.GetArrayFromImage(im) > 0)[:, ::-1]  # (z, y, x) -> (x, y, z)
            pts = np.array([im.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx.astype(float)])
            centroids.append(pts.mean(0))
        # ITK reads NIfTI into LPS too; NIfTI keeps float32 geometry (1e-3 mm), NRRD doubles.
        assert np.allclose(centroids[0], centroids[1], atol=1e-3)
        assert back.GetSize() == src.GetSize() and np.allclose(back.GetOrigin(), src.GetOrigin(), atol=1e-3)
    # The lesion is tissue-dense (HU above lung parenchyma): the overlay lands on it, not beside it.
    assert np.median(hu[label > 0]) > -400


def test_lung_mask_on_real_ct(lung1):
    img, hu, label, lungs = lung1
    spacing = spacing_of(img.affine)
    litres = lungs.sum() * np.prod(spacing) / 1e6
    assert 1.0 < litres < 8.0  # two adult lungs over 48 slices of 5 mm
    assert (lungs & (label > 0)).sum() == (label > 0).sum()  # the whole labelled lesion
    tissue = hu > -200  # soft tissue and bone of the body
    assert (lungs & tissue).sum() < 0.05 * tissue.sum()


def test_lung_mask_on_a_phantom():
    spec = PhantomSpec(shape=(80, 72, 24), spacing=(1.2, 1.2, 2.5), diameter_mm=(8.0, 14.0), nodules=(2, 2))
    image, label, affine, nodules = make_phantom(seed=3, index=0, spec=spec, with_nodules=True)
    lungs = lung_mask(image, spacing_of(affine), axial_axis(affine))
    assert len(nodules) == 2 and (lungs & (label > 0)).sum() >= 0.98 * (label > 0).sum()
    assert (lungs & (image > -200)).sum() - (lungs & (label > 0)).sum() < 0.05 * (image > -200).sum()
    assert not lungs[image < -950].any()  # air outside the body
    assert not lung_mask(np.full((8, 8, 4), -1000.0), (1.0, 1.0, 1.0)).any()


def test_predict_on_real_nrrd_keeps_the_grid(radiomics_data, lung1, tmp_path, capsys):
    cfg = UNetConfig(features=4, depth=2, patch_size=(32, 32, 16), target_spacing=(4.0, 4.0, 5.0))
    torch.manual_seed(0)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": build_model(model_kwargs(cfg)).state_dict(), "config": checkpoint_config(cfg)}, ckpt)
    for sub, name in (("images", "lung1_image.nrrd"), ("labels", "lung1_label.nrrd")):
        (tmp_path / "ds" / sub).mkdir(parents=True, exist_ok=True)
        os.symlink(radiomics_data / name, tmp_path / "ds" / sub / "lung1.nrrd")
    args = ["--checkpoint", str(ckpt), str(tmp_path / "ds"), "--out", str(tmp_path / "pred"), "--split", "train"]
    written = predict.main([*args, "--format", "both", "--lung-mask", "--threads", "2"])
    assert [p.name for p in written] == ["lung1_mask.nii.gz", "lung1_mask.nrrd"]
    src = sitk.ReadImage(str(radiomics_data / "lung1_image.nrrd"))
    for path in written:
        out = sitk.ReadImage(str(path))
        assert out.GetSize() == src.GetSize() and np.allclose(out.GetSpacing(), src.GetSpacing(), atol=1e-5)
        assert np.allclose(out.GetOrigin(), src.GetOrigin(), atol=1e-3) and out.GetDirection() == src.GetDirection()
    text = capsys.readouterr().out
    assert "inside the lung mask" in text and "outside the label" in text and "mean Dice" in text
    mask, lungs = read_image(written[1])[1], lung1[3]
    assert not (mask.astype(bool) & ~lungs).any()  # nothing kept outside the lungs


def test_predict_job_exits_non_zero_naming_the_file(tmp_path):
    ckpt = tmp_path / "best.pt"
    cfg = UNetConfig(features=4, depth=2, patch_size=(16, 16, 16))
    torch.save({"model": build_model(model_kwargs(cfg)).state_dict(), "config": checkpoint_config(cfg)}, ckpt)
    (tmp_path / "ct.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = ct.raw\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.predict",
            "--checkpoint",
            str(ckpt),
            str(tmp_path / "ct.mhd"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "ct.mhd: its data file" in proc.stderr and "Traceback" not in proc.stderr
    assert predict.cli(["--checkpoint", str(ckpt), str(tmp_path / "nothere.nrrd"), "--out", str(tmp_path / "o")]) == 2
    # A label on another grid than its image: named, not scored against the wrong voxels.
    for sub, origin in (("images", (0.0, 0.0, 0.0)), ("labels", (3.0, 0.0, 0.0))):
        img = sitk.GetImageFromArray(np.zeros((16, 16, 16), np.int16))
        img.SetOrigin(origin)
        (tmp_path / "ds" / sub).mkdir(parents=True)
        sitk.WriteImage(img, str(tmp_path / "ds" / sub / "a.nrrd"))
    args = ["--checkpoint", str(ckpt), str(tmp_path / "ds"), "--out", str(tmp_path / "o"), "--split", "train"]
    with pytest.raises(CaseMismatchError, match=r"labels/a\.nrrd and image .*images/a\.nrrd"):
        predict.main(args)
