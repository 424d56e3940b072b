"""Orientation round trip, resampling, HU window, the .npy cache and its invalidation."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from segmentation.io import Case
from segmentation.preprocess import (
    PreprocessParams,
    from_canonical,
    invert_to_original,
    normalize,
    preprocess_arrays,
    preprocess_dataset,
    resample,
    spacing_of,
    target_shape,
    to_canonical,
)

# LPS-like storage with permuted axes: array axis 0 is z (inferior->superior), 1 is x (flipped), 2 is y.
ODD_AFFINE = np.array([[0, -0.7, 0, 10], [0, 0, 0.9, -5], [2.5, 0, 0, 3], [0, 0, 0, 1]], dtype=float)


def test_canonical_round_trip():
    data = np.random.default_rng(0).normal(size=(7, 8, 9)).astype(np.float32)
    canon, affine = to_canonical(data, ODD_AFFINE)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert canon.shape == (8, 9, 7) and spacing_of(affine) == pytest.approx((0.7, 0.9, 2.5))
    assert np.array_equal(from_canonical(canon, ODD_AFFINE), data)
    # The same voxel sits at the same world position in both grids.
    world = ODD_AFFINE @ np.array([1, 2, 3, 1])
    idx = np.linalg.solve(affine, world)[:3].round().astype(int)
    assert canon[tuple(idx)] == data[1, 2, 3]


def test_resample_and_target_shape():
    assert target_shape((100, 100, 40), (0.8, 0.8, 2.5), (1.6, 0.0, 1.25)) == (50, 100, 80)
    label = np.zeros((20, 20, 8), np.uint8)
    label[5:12, 5:12, 2:6] = 1
    out = resample(label, (10, 10, 16), is_label=True)
    assert out.shape == (10, 10, 16) and out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    img = resample(label.astype(np.float32), (10, 10, 16), is_label=False)
    assert img.dtype == np.float32 and 0 < img.max() <= 1


def test_hu_window():
    hu = np.array([-2000, -1000, -300, 400, 3000], dtype=np.int16)
    assert np.allclose(normalize(hu, (-1000, 400)), [0, 0, 0.5, 1, 1])
    z = normalize(hu, (-1000, 400), "zscore")
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1, abs=1e-5)


def test_preprocess_and_invert_geometry():
    rng = np.random.default_rng(1)
    image = rng.normal(-500, 300, size=(12, 14, 10)).astype(np.float32)
    label = (rng.random((12, 14, 10)) > 0.8).astype(np.uint8)
    params = PreprocessParams(target_spacing=(0.0, 0.0, 0.0))
    img, lab, geo = preprocess_arrays(image, ODD_AFFINE, label, params)
    assert img.shape == lab.shape == tuple(geo["shape"]) == (14, 10, 12)
    back = invert_to_original(lab.astype(np.float32), geo)
    assert np.array_equal(back > 0.5, label > 0)  # no resampling: exact
    params = PreprocessParams(target_spacing=(1.4, 0.9, 1.25))
    img, lab, geo = preprocess_arrays(image, ODD_AFFINE, label, params)
    assert img.shape == (7, 10, 24) and geo["spacing"] == [1.4, 0.9, 1.25]
    assert invert_to_original(img, geo).shape == image.shape


def _case(tmp_path, name="c1", shape=(10, 11, 6)):
    img = np.random.default_rng(2).integers(-1000, 400, size=shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[3:6, 3:6, 2:4] = 1
    affine = np.diag([-0.8, 0.8, 2.5, 1.0])
    ip, lp = tmp_path / f"{name}_img.nii.gz", tmp_path / f"{name}_lab.nii.gz"
    nib.save(nib.Nifti1Image(img, affine), str(ip))
    nib.save(nib.Nifti1Image(lab, affine), str(lp))
    return Case(name, ip, lp)


def test_cache_reuse_and_invalidation(tmp_path):
    case = _case(tmp_path)
    params = PreprocessParams(target_spacing=(1.6, 1.6, 2.5))
    (entry,) = preprocess_dataset([case], tmp_path / "cache", params)
    img, lab = entry.arrays()
    assert isinstance(img, np.memmap) and img.shape == (5, 6, 6) and lab.dtype == np.uint8
    assert entry.info()["foreground_voxels"] == int(lab.sum()) > 0
    mtime = entry.image.stat().st_mtime_ns
    (again,) = preprocess_dataset([case], tmp_path / "cache", params)
    assert again == entry and entry.image.stat().st_mtime_ns == mtime  # cached: not rewritten
    (other,) = preprocess_dataset([case], tmp_path / "cache", PreprocessParams(window=(-1000.0, 0.0)))
    assert other.image.parent != entry.image.parent  # new parameters, new folder
    st = case.image.stat()
    os.utime(case.image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed
    (fresh,) = preprocess_dataset([case], tmp_path / "cache", params)
    assert fresh.image != entry.image and fresh.image.is_file()


def test_sharded_preprocessing(tmp_path):
    cases = [_case(tmp_path, f"c{i}") for i in range(3)]
    entries = preprocess_dataset(cases, tmp_path / "cache", PreprocessParams(), shard=(1, 2))
    assert [e.image.is_file() for e in entries] == [False, True, False]
    entries = preprocess_dataset(cases, tmp_path / "cache", PreprocessParams(), shard=(0, 2))
    assert all(e.image.is_file() and e.meta.is_file() for e in entries)


def test_bad_params():
    with pytest.raises(ValueError, match="normalize"):
        PreprocessParams(normalize="percentile")
    with pytest.raises(ValueError, match="window"):
        PreprocessParams(window=(400.0, -1000.0))
