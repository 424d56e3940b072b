"""The uint8 image/mask cache: built once, reused, rebuilt when a source changes; bad files named; test isolation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from classification.cache import CachedDataset, ImageCache, build_cache, prepare_cache, read_mask, source_stamp
from classification.config import ClassifierConfig
from classification.data import ImageReadError, scan_folder
from classification.engine import build_run
from classification.splits import prepare_splits
from classification.synthetic import generate


def _write(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture()
def busi_like(tmp_path):
    root = tmp_path / "data"
    for cls in ("benign", "normal"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _write(root / cls / f"{cls} ({i}).png", np.full((30, 40, 3), 40 * i + (cls == "normal") * 5))
    m = np.zeros((30, 40), np.uint8)
    m[:10, :10] = 255
    _write(root / "benign" / "benign (0)_mask.png", m)
    m2 = np.zeros((30, 40), np.uint8)
    m2[20:, 30:] = 255
    _write(root / "benign" / "benign (0)_mask_1.png", m2)
    return root


def test_cache_holds_resized_images_and_mask_union(busi_like, tmp_path):
    index = scan_folder(busi_like)
    cache = build_cache(index.samples, tmp_path / "c", 16)
    assert cache.images.shape == (6, 16, 16, 3) and cache.images.dtype == np.uint8
    assert cache.masks.shape == (6, 16, 16)
    first = index.paths.index(busi_like / "benign" / "benign (0).png")
    mask = cache.masks[first]
    assert mask[0, 0] == 255 and mask[-1, -1] == 255 and mask[8, 4] == 0  # both masks, unioned
    assert set(np.unique(mask)) <= {0, 255}
    assert cache.masks[[i for i in range(6) if i != first]].max() == 0  # no mask file: empty
    assert int(cache.images[index.paths.index(busi_like / "benign" / "benign (2).png")].mean()) == 80
    assert np.load(tmp_path / "c" / "images.npy", mmap_mode="r").shape[0] == 6
    assert not list((tmp_path / "c").glob("*.tmp"))  # atomic writes leave no temporaries


def test_cache_reused_then_rebuilt_after_a_file_changes(busi_like, tmp_path):
    index = scan_folder(busi_like)
    folder = tmp_path / "c"
    prepare_cache(index.samples, folder, 16)
    t0 = (folder / "images.npy").stat().st_mtime_ns
    prepare_cache(index.samples, folder, 16)
    assert (folder / "images.npy").stat().st_mtime_ns == t0  # reused: stamp unchanged
    target = busi_like / "normal" / "normal (1).png"
    stamp = source_stamp(index.samples, 16)
    _write(target, np.full((30, 40, 3), 200))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse file-system clocks
    assert source_stamp(index.samples, 16) != stamp
    cache = prepare_cache(index.samples, folder, 16)
    assert int(cache.images[index.paths.index(target)].mean()) == 200
    # a new mask beside an image also invalidates the cache
    stamp = source_stamp(index.samples, 16)
    _write(busi_like / "normal" / "normal (1)_mask.png", np.full((30, 40), 255))
    assert source_stamp(index.samples, 16) != stamp
    assert prepare_cache(index.samples, folder, 16).masks[index.paths.index(target)].min() == 255
    assert source_stamp(index.samples, 20) != source_stamp(index.samples, 16)  # side is part of the stamp


def test_truncated_png_is_named(busi_like, tmp_path):
    index = scan_folder(busi_like)
    bad = busi_like / "normal" / "normal (2).png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(ImageReadError, match=r"normal \(2\)\.png"):
        prepare_cache(index.samples, tmp_path / "c", 16)
    assert not (tmp_path / "c" / "stamp.json").exists()
    with pytest.raises(ImageReadError, match="mask.png"):
        (busi_like / "benign" / "benign (1)_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        read_mask([busi_like / "benign" / "benign (1)_mask.png"], 8)


def test_cached_dataset_pickles_without_arrays(busi_like, tmp_path):
    import pickle

    from classification.augment import EvalPipeline, TrainPipeline

    index = scan_folder(busi_like)
    cache = build_cache(index.samples, tmp_path / "c", 20)
    _ = cache.images
    for pipe in (EvalPipeline(16), TrainPipeline(16, "trivial", elastic=0.5, speckle=0.1)):
        ds = pickle.loads(pickle.dumps(CachedDataset(cache, [4, 1], index.labels[[4, 1]], pipe)))
        assert ds.cache._images is None  # workers reopen the memmap instead of copying it
        x, y, i, m = ds[1]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and m.shape == (1, 16, 16)
        assert (y, i) == (int(index.labels[1]), 1)
    assert isinstance(ds.cache, ImageCache)


def test_test_split_never_reaches_training_or_selection(tmp_path):
    """Every fold's training and validation images (what fit trains on and picks best.pt by) avoid the test split."""
    generate(tmp_path / "us", n_per_class=10, size=40, seed=1)
    index = scan_folder(tmp_path / "us")
    splits = prepare_splits(index, tmp_path / "run", 3, 0, 0.25, 6)
    test = set(splits.test)
    assert len(test) >= 6
    cfg = ClassifierConfig(data=str(tmp_path / "us"), model="small_cnn", image_size=24, resize_size=28,
                           run_dir=str(tmp_path / "run"), mask_weight=0.5, batch_size_per_gpu=4)  # fmt: skip
    seen = set()
    for fold in splits.folds:
        run = build_run(cfg, index, fold)
        train_idx, val_idx = set(run.train.dataset.indices), set(run.val.dataset.indices)
        assert not (train_idx | val_idx) & test
        seen |= train_idx | val_idx
        assert run.train.dataset.labels.tolist() == index.labels[sorted(train_idx)].tolist()
    assert seen | test == set(range(len(index.samples)))
