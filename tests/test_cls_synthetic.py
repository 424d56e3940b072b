"""The synthetic ultrasound generator: deterministic, BUSI-shaped (imbalance, masks, near-duplicates)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from classification.data import scan_folder
from classification.synthetic import class_counts, generate
from jobs import make_ultrasound


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path):
    generate(tmp_path / "a", n_per_class=5, size=48, seed=7)
    generate(tmp_path / "b", n_per_class=5, size=48, seed=7)
    generate(tmp_path / "c", n_per_class=5, size=48, seed=8)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a != c


def test_busi_shape(tmp_path):
    info = generate(tmp_path, n_per_class=20, size=64, seed=0, second_lesion_fraction=0.3)
    counts = info["counts"]
    assert counts == class_counts(20) and counts["benign"] > counts["malignant"] > counts["normal"]
    assert sum(counts.values()) == 60
    index = scan_folder(tmp_path)  # every mask has its image; masks are not samples
    assert index.class_counts() == counts
    for p in index.paths:
        mask = p.with_name(p.stem + "_mask.png")
        assert mask.is_file()
        m = np.asarray(Image.open(mask))
        assert m.shape == np.asarray(Image.open(p)).shape
        assert (m.max() == 0) == (index.class_names[index.samples[index.paths.index(p)].label] == "normal")
    assert info["second_lesion"] and all(
        (tmp_path / s.replace(".png", "_mask_1.png")).is_file() for s in info["second_lesion"]
    )
    assert len(info["duplicates"]) == sum(round(c * 0.1) for c in counts.values())
    assert json.loads((tmp_path / "synthetic_info.json").read_text())["counts"] == counts


def test_lesions_are_dark_and_shaped(tmp_path):
    """Benign masks are wider than tall, malignant ones taller than wide, and lesions darker than tissue."""
    generate(tmp_path, n_per_class=10, size=96, seed=1, dup_fraction=0.0, second_lesion_fraction=0.0)
    ratios = {"benign": [], "malignant": []}
    for cls in ratios:
        for mask in (tmp_path / cls).glob("*_mask.png"):
            m = np.asarray(Image.open(mask)) > 0
            img = np.asarray(Image.open(mask.with_name(mask.name.replace("_mask", ""))), dtype=float)
            ys, xs = np.nonzero(m)
            ratios[cls].append((np.ptp(xs) + 1) / (np.ptp(ys) + 1))
            assert img[m].mean() < 0.7 * img[~m].mean()
    assert np.median(ratios["benign"]) > 1.2 and np.median(ratios["malignant"]) < 1.0


def test_cli(tmp_path, capsys):
    assert make_ultrasound.main([str(tmp_path / "us"), "--n-per-class", "4", "--size", "40", "--seed", "2"]) == 0
    assert "wrote 15 images" in capsys.readouterr().out
    assert len(scan_folder(tmp_path / "us", verify=False).samples) == 15
