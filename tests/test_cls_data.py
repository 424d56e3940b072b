"""Data scanning: masks excluded, any class count, any image mode, bad input named in the error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from classification.data import (
    DataError,
    ImageDataset,
    ImageReadError,
    is_mask,
    list_images,
    load_rgb,
    mask_stem,
    read_manifest,
    scan_folder,
)
from classification.transforms import eval_transform, train_transform


def _png(path, size=(40, 30), mode="L", value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


@pytest.fixture
def busi(tmp_path):
    """Three classes in the BUSI naming, each image with masks beside it (one with _mask_1)."""
    root = tmp_path / "busi"
    for cls in ("normal", "benign", "malignant"):
        for i in (1, 2, 3):
            _png(root / cls / f"{cls} ({i}).png")
            _png(root / cls / f"{cls} ({i})_mask.png", value=255)
        _png(root / cls / f"{cls} (1)_mask_1.png", value=255)
    (root / "README.txt").write_text("files at the root are ignored")
    return root


def test_mask_names():
    for name in ("benign (3)_mask.png", "benign (3)_mask_1.png", "x_Mask2.png", "x_MASK-3.tif"):
        assert is_mask(name), name
    for name in ("benign (3).png", "mask.png", "masked_lesion.png", "x_masks.png"):
        assert not is_mask(name), name
    assert mask_stem("benign (3)_mask_1.png") == "benign (3)"


def test_scan_excludes_masks_and_sorts_classes(busi):
    index = scan_folder(busi)
    assert index.class_names == ["benign", "malignant", "normal"]
    assert len(index.samples) == 9
    assert not any("mask" in p.name for p in index.paths)
    assert index.class_counts() == {"benign": 3, "malignant": 3, "normal": 3}
    assert [s.label for s in index.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_any_number_of_classes_and_extensions(tmp_path):
    for k, cls in enumerate(["a", "b", "c", "d"]):
        _png(tmp_path / cls / f"x.{['png', 'jpg', 'bmp', 'tif'][k]}", mode="RGB")
    index = scan_folder(tmp_path)
    assert index.class_names == ["a", "b", "c", "d"]
    assert len(index.samples) == 4


def test_image_modes_become_rgb(tmp_path):
    _png(tmp_path / "l.png", size=(5, 4), mode="L", value=7)
    Image.new("RGBA", (5, 4), (10, 20, 30, 255)).save(tmp_path / "rgba.png")
    Image.new("RGBA", (5, 4), (200, 200, 200, 0)).save(tmp_path / "clear.png")  # transparent: black
    Image.new("P", (5, 4), 3).save(tmp_path / "p.png")
    wide = np.full((4, 5), 1000, dtype=np.uint16)
    wide[0, 0] = 60000
    Image.fromarray(wide).save(tmp_path / "i16.png")
    for name in ("l", "rgba", "clear", "p", "i16"):
        img = load_rgb(tmp_path / f"{name}.png")
        assert img.mode == "RGB" and img.size == (5, 4), name
    assert np.asarray(load_rgb(tmp_path / "l.png"))[0, 0].tolist() == [7, 7, 7]
    assert np.asarray(load_rgb(tmp_path / "rgba.png"))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(load_rgb(tmp_path / "clear.png")).max() == 0
    i16 = np.asarray(load_rgb(tmp_path / "i16.png"))
    # 16-bit range stretched, not clipped to white: the bright pixel is 255, the rest dark.
    assert i16[0, 0, 0] == 255 and i16[1, 1, 0] == 0


def test_missing_root_and_missing_class(tmp_path, busi):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cysts"):
        scan_folder(busi, classes=["normal", "benign", "cysts"])
    assert scan_folder(busi, classes=["normal", "benign"]).class_names == ["normal", "benign"]


def test_class_folder_without_images(busi):
    (busi / "other").mkdir()
    (busi / "other" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="other holds no images"):
        scan_folder(busi)


def test_only_one_class(tmp_path):
    _png(tmp_path / "a" / "x.png")
    with pytest.raises(DataError, match="at least 2"):
        scan_folder(tmp_path)


def test_unreadable_image_error_or_counted_skip(busi):
    bad = busi / "benign" / "benign (9).png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match=r"benign \(9\)\.png"):
        scan_folder(busi)
    index = scan_folder(busi, skip_bad=True)
    assert len(index.samples) == 9
    assert [p for p, _ in index.skipped] == [str(bad)]


def test_truncated_image(busi):
    good = busi / "benign" / "benign (1).png"
    bad = busi / "benign" / "benign (8).png"
    Image.new("L", (200, 200), 3).save(good)
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ImageReadError, match=r"benign \(8\)"):
        scan_folder(busi)


def test_mask_without_image(busi):
    orphan = _png(busi / "malignant" / "malignant (7)_mask.png")
    with pytest.raises(DataError, match=r"malignant \(7\)_mask\.png"):
        scan_folder(busi)
    index = scan_folder(busi, skip_bad=True)
    assert len(index.samples) == 9 and index.skipped[0][0] == str(orphan)


def test_manifest(tmp_path, busi):
    csv = tmp_path / "m.csv"
    csv.write_text(
        "path,label\nbusi/benign/benign (1).png,benign\nbusi/normal/normal (2).png,normal\n"
        f"{busi / 'benign' / 'benign (2).png'},benign\n"
    )
    index = read_manifest(csv)
    assert index.class_names == ["benign", "normal"]
    assert [s.label for s in index.samples] == [0, 1, 0]
    csv.write_text("path,label\nbusi/benign/benign (1)_mask.png,benign\n")
    with pytest.raises(DataError, match="mask"):
        read_manifest(csv)
    csv.write_text("path,label\nbusi/benign/nothere.png,benign\n")
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_manifest(csv)
    csv.write_text("file,class\nx,y\n")
    with pytest.raises(DataError, match="path,label"):
        read_manifest(csv)
    with pytest.raises(FileNotFoundError, match="none.csv"):
        read_manifest(tmp_path / "none.csv")


def test_dataset_and_transforms(busi):
    index = scan_folder(busi)
    ds = ImageDataset(index.samples, eval_transform(56, 64))
    x, y, i = ds[4]
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32 and y == 1 and i == 4
    xt, _, _ = ImageDataset(index.samples, train_transform(32))[0]
    assert xt.shape == (3, 32, 32)
    with pytest.raises(ValueError):
        eval_transform(64, 32)


def test_list_images_expands_folders(busi):
    paths = list_images([busi / "benign", busi / "normal" / "normal (1).png"])
    assert len(paths) == 4 and not any(is_mask(p) for p in paths)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list_images([busi / "missing.png"])
