"""Near-duplicate grouping and grouped stratified folds: duplicates never straddle a split, folds stratified."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from classification.data import DataError, scan_folder
from classification.dedup import (
    find_duplicates,
    group_by_hash,
    group_pairs,
    hamming_matrix,
    phash,
    phash_image,
    shifted_correlation,
)
from classification.splits import (
    grouped_kfold,
    holdout_split,
    load_splits,
    make_splits,
    prepare_splits,
    save_splits,
)
from classification.synthetic import generate


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("us")
    info = generate(root, n_per_class=20, size=64, seed=3, dup_fraction=0.15)
    return root, info


def _planted_pairs(root, info, index):
    pos = {p.relative_to(root).as_posix(): i for i, p in enumerate(index.paths)}
    return [(pos[a], pos[b]) for a, b in info["duplicates"]]


def test_hamming_matches_naive():
    rng = np.random.default_rng(0)
    bits = rng.random((7, 64)) < 0.5
    d = hamming_matrix(bits)
    naive = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    assert np.array_equal(d, naive)
    odd = rng.random((3, 36)) < 0.5  # not a multiple of 64 bits
    assert np.array_equal(hamming_matrix(odd), (odd[:, None] != odd[None]).sum(axis=2))


def test_phash_stable_under_reencoding_and_brightness(tmp_path):
    rng = np.random.default_rng(1)
    arr = (rng.random((80, 90)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    img.save(tmp_path / "a.png")
    img.convert("RGB").save(tmp_path / "b.jpg", quality=95)
    assert (phash(tmp_path / "a.png") != phash(tmp_path / "b.jpg")).sum() <= 4
    brighter = Image.fromarray(np.clip(arr.astype(int) + 10, 0, 255).astype(np.uint8))
    assert (phash_image(img) != phash_image(brighter)).sum() <= 4


def test_union_find_is_transitive():
    groups = group_pairs(6, np.array([[0, 3], [3, 5], [1, 2]]))
    assert groups.tolist() == [0, 1, 1, 0, 2, 0]
    bits = np.zeros((3, 64), dtype=bool)
    bits[1, :3] = True  # 0-1: 3 bits, 1-2: 3 bits, 0-2: 6 bits
    bits[2, :6] = True
    assert group_by_hash(bits, 3).tolist() == [0, 0, 0]
    assert group_by_hash(bits, 2).tolist() == [0, 1, 2]


def test_shifted_correlation_finds_shift():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((1, 32, 32))
    b = np.roll(a, (1, -2), axis=(1, 2))
    assert shifted_correlation(a, b)[0] > 0.85
    assert abs(shifted_correlation(a, rng.standard_normal((1, 32, 32)))[0]) < 0.3


def test_planted_duplicates_found_without_false_pairs(synth):
    root, info = synth
    index = scan_folder(root, verify=False)
    report = find_duplicates(index.paths, index.labels)
    planted = _planted_pairs(root, info, index)
    assert all(report.groups[i] == report.groups[j] for i, j in planted)
    truth = group_pairs(len(index.paths), np.array(planted))
    assert all(truth[i] == truth[j] for i, j in report.pairs), "an unrelated pair was grouped"
    assert report.summary()["redundant_images"] == len(planted)
    assert report.mixed_label_groups == []


def test_folds_grouped_stratified_and_complete(synth):
    root, info = synth
    index = scan_folder(root, verify=False)
    splits = make_splits(index, n_splits=5, seed=0)
    labels, groups = index.labels, np.array(splits.groups)
    seen = np.zeros(len(labels), dtype=int)
    overall = np.bincount(labels) / len(labels)
    for f in splits.folds:
        assert not set(groups[f.train]) & set(groups[f.val])
        seen[f.val] += 1
        share = np.bincount(labels[f.val], minlength=3) / len(f.val)
        assert np.abs(share - overall).max() < 0.12, share  # stratified
    assert (seen == 1).all()
    for i, j in _planted_pairs(root, info, index):  # duplicates on one side of every split
        for f in splits.folds:
            assert (i in f.val) == (j in f.val)


def test_holdout_and_folds_are_disjoint(synth):
    root, _ = synth
    index = scan_folder(root, verify=False)
    splits = make_splits(index, n_splits=3, seed=1, test_fraction=0.2)
    groups = np.array(splits.groups)
    assert 0.1 < len(splits.test) / len(index.samples) < 0.3
    for f in splits.folds:
        assert not set(f.train + f.val) & set(splits.test)
        assert not set(groups[f.train + f.val]) & set(groups[splits.test])
    assert sorted(splits.test + [i for f in splits.folds for i in f.val]) == list(range(len(index.samples)))
    assert set(index.labels[splits.test]) == {0, 1, 2}


def test_seeded_and_saved(tmp_path, synth):
    root, _ = synth
    index = scan_folder(root, verify=False)
    a = prepare_splits(index, tmp_path, n_splits=5, seed=4)
    assert (tmp_path / "splits.json").is_file()
    b = prepare_splits(index, tmp_path, n_splits=5, seed=4)  # read back, not recomputed
    assert a.folds == b.folds and a.groups == b.groups
    assert make_splits(index, 5, seed=4).folds == a.folds
    assert make_splits(index, 5, seed=5).folds != a.folds
    with pytest.raises(DataError, match="settings"):
        prepare_splits(index, tmp_path, n_splits=4, seed=4)
    fewer = scan_folder(root, classes=["benign", "malignant"], verify=False)
    with pytest.raises(DataError, match="classes"):
        load_splits(tmp_path / "splits.json", fewer)
    data = json.loads((tmp_path / "splits.json").read_text())
    data["samples"][0]["label"] = 2
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="different dataset"):
        load_splits(tmp_path / "other.json", index)
    save_splits(a, tmp_path / "copy.json")
    assert load_splits(tmp_path / "copy.json", index).folds == a.folds


def test_too_few_groups():
    with pytest.raises(DataError, match="groups"):
        grouped_kfold([0, 1, 0, 1], [0, 0, 1, 1], n_splits=3)
    with pytest.raises(ValueError):
        holdout_split([0, 1] * 5, list(range(10)), test_fraction=0.9)
