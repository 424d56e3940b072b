"""Patch sampler: foreground share, reproducibility, padding, aligned augmentation; whole-volume dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segmentation.io import DataError
from segmentation.preprocess import CachedCase
from segmentation.sampling import Augment, PatchDataset, VolumeDataset, crop_with_pad


def _cached(tmp_path, name, image, label):
    ip, lp, mp = tmp_path / f"{name}.image.npy", tmp_path / f"{name}.label.npy", tmp_path / f"{name}.json"
    np.save(ip, image.astype(np.float32))
    np.save(lp, label.astype(np.uint8))
    mp.write_text(json.dumps({"shape": list(image.shape), "image_source": f"/data/{name}.nii.gz"}))
    return CachedCase(name, ip, lp, mp)


def _nodule_case(tmp_path, name="n", shape=(40, 40, 24)):
    label = np.zeros(shape, np.uint8)
    label[30:33, 8:11, 5:7] = 1  # 18 voxels: one uniform crop in ~ many would touch it
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    return _cached(tmp_path, name, image, label)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_foreground_share(tmp_path, share):
    ds = PatchDataset([_nodule_case(tmp_path)], (8, 8, 8), samples_per_volume=300, fg_share=share, seed=1)
    centred = np.array([ds.sample(i)[2] for i in range(len(ds))])
    with_fg = np.array([ds.sample(i)[1].any() for i in range(len(ds))])
    assert abs(centred.mean() - share) < 0.08
    assert with_fg[centred].all()  # a centred patch always holds its nodule
    assert with_fg.mean() >= share - 0.08 and (share == 1.0 or with_fg[~centred].mean() < 0.2)


def test_reproducible_per_seed_epoch_index(tmp_path):
    case = _nodule_case(tmp_path)
    a = PatchDataset([case], (8, 8, 8), samples_per_volume=4, seed=3)
    b = PatchDataset([case], (8, 8, 8), samples_per_volume=4, seed=3)
    for i in range(4):
        assert all(np.array_equal(x, y) for x, y in zip(a.sample(i)[:2], b.sample(i)[:2]))
    b.set_epoch(1)
    assert not all(np.array_equal(a.sample(i)[0], b.sample(i)[0]) for i in range(4))
    img, lab = a[0]
    assert img.shape == lab.shape == (1, 8, 8, 8) and str(img.dtype) == "torch.float32"


def test_augmentation_keeps_image_and_label_aligned(tmp_path):
    label = np.zeros((20, 20, 10), np.uint8)
    label[2:9, 4:6, 1:8] = 1
    label[12:15, 10:18, 3:4] = 1
    case = _cached(tmp_path, "a", label.astype(np.float32), label)
    ds = PatchDataset([case], (12, 12, 6), 50, 0.7, Augment(intensity_scale=0, intensity_shift=0), seed=0)
    for i in range(len(ds)):
        img, lab, _ = ds.sample(i)
        assert np.array_equal(img, lab)


def test_small_volume_is_padded_or_rejected(tmp_path):
    case = _nodule_case(tmp_path, "small", shape=(6, 40, 5))
    ds = PatchDataset([case], (8, 8, 8), 3, 0.0, Augment(enabled=False), pad_value=-1.0)
    img, _, _ = ds.sample(0)
    assert img.shape == (8, 8, 8) and (img == -1.0).any()
    with pytest.raises(DataError, match=r"larger than case small \(/data/small\.nii\.gz\)"):
        PatchDataset([case], (8, 8, 8), small_volume="error")


def test_crop_with_pad():
    vol = np.arange(27).reshape(3, 3, 3)
    out = crop_with_pad(vol, (-1, 1, 2), (3, 3, 3), pad_value=-5)
    assert out[1, 0, 0] == vol[0, 1, 2] and out[0, 0, 0] == -5 and out[1, 2, 0] == -5


def test_volume_dataset(tmp_path):
    case = _nodule_case(tmp_path)
    image, label, case_id = VolumeDataset([case])[0]
    assert image.shape == label.shape == (1, 40, 40, 24) and case_id == "n" and int(label.sum()) == 18
