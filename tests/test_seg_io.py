"""Dataset layouts and clear errors that name the file: missing folder, corrupt NIfTI, mismatches, bad labels."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from segmentation.io import (
    CaseMismatchError,
    EmptyDatasetError,
    LabelValueError,
    NiftiReadError,
    list_cases,
    load_pair,
    read_nifti,
    write_mask,
)

AFFINE = np.diag([-0.8, 0.8, 2.5, 1.0])


def _save(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def _decathlon(root, n=2):
    entries = []
    for i in range(n):
        _save(root / "imagesTr" / f"lung_{i:03d}.nii.gz", np.zeros((6, 5, 4), np.int16))
        _save(root / "labelsTr" / f"lung_{i:03d}.nii.gz", np.zeros((6, 5, 4), np.uint8))
        entries.append({"image": f"./imagesTr/lung_{i:03d}.nii.gz", "label": f"./labelsTr/lung_{i:03d}.nii.gz"})
    _save(root / "imagesTs" / "lung_100.nii.gz", np.zeros((6, 5, 4), np.int16))
    (root / "imagesTr" / "._lung_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    meta = {
        "training": entries + [{"image": "./imagesTr/._lung_000.nii.gz", "label": "./labelsTr/x.nii.gz"}],
        "test": ["./imagesTs/lung_100.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_decathlon_layout(tmp_path):
    root = _decathlon(tmp_path / "Task06_Lung")
    cases = list_cases(root)
    assert [c.case_id for c in cases] == ["lung_000", "lung_001"]
    assert cases[0].image == (root / "imagesTr" / "lung_000.nii.gz").resolve() and cases[0].label.is_file()
    test = list_cases(root, "test")
    assert [c.case_id for c in test] == ["lung_100"] and test[0].label is None
    with pytest.raises(EmptyDatasetError, match="no val cases"):
        list_cases(root, "val")


def test_plain_layout(tmp_path):
    for name in ("a", "b"):
        _save(tmp_path / "images" / f"{name}.nii.gz", np.zeros((3, 3, 3)))
        _save(tmp_path / "labels" / f"{name}.nii.gz", np.zeros((3, 3, 3), np.uint8))
    (tmp_path / "images" / "._a.nii.gz").write_bytes(b"junk")
    assert [c.case_id for c in list_cases(tmp_path)] == ["a", "b"]
    (tmp_path / "labels" / "b.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.nii\.gz has no label"):
        list_cases(tmp_path)
    assert [c.label is None for c in list_cases(tmp_path, "test")] == [False, True]


def test_missing_folder_and_missing_listed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_cases(tmp_path / "nowhere")
    root = _decathlon(tmp_path / "d")
    (root / "labelsTr" / "lung_001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lung_001\.nii\.gz"):
        list_cases(root)


def test_empty_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(EmptyDatasetError, match=str(tmp_path)):
        list_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(EmptyDatasetError, match="no train cases"):
        list_cases(tmp_path)


def test_truncated_nifti_names_the_file(tmp_path):
    path = _save(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NiftiReadError, match=r"ct\.nii\.gz"):
        read_nifti(path)
    bad = tmp_path / "notnifti.nii.gz"
    bad.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(NiftiReadError, match=r"notnifti\.nii\.gz"):
        read_nifti(bad)


def test_shape_and_affine_mismatch(tmp_path):
    root = _decathlon(tmp_path / "d", n=1)
    _save(root / "labelsTr" / "lung_000.nii.gz", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(CaseMismatchError, match=r"labelsTr/lung_000\.nii\.gz.*shape \(6, 5, 3\)"):
        load_pair(list_cases(root)[0])
    _save(root / "labelsTr" / "lung_000.nii.gz", np.zeros((6, 5, 4), np.uint8), np.diag([0.8, 0.8, 2.5, 1.0]))
    with pytest.raises(CaseMismatchError, match="different affines"):
        load_pair(list_cases(root)[0])


def test_labels_must_be_binary(tmp_path):
    root = _decathlon(tmp_path / "d", n=1)
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[0, 0, 0] = 2
    _save(root / "labelsTr" / "lung_000.nii.gz", lab)
    with pytest.raises(LabelValueError, match=r"lung_000\.nii\.gz.*\[2\]"):
        load_pair(list_cases(root)[0])


def test_write_mask_keeps_affine_and_header(tmp_path):
    src = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), AFFINE)
    src.header.set_xyzt_units("mm", "sec")
    src.header["descrip"] = b"source scan"
    src.set_qform(AFFINE, code=1)
    src.set_sform(AFFINE, code=2)
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1, 2, 3] = 1
    out = nib.load(str(write_mask(mask, src, tmp_path / "out" / "m.nii.gz")))
    assert np.allclose(out.affine, AFFINE) and out.get_data_dtype() == np.uint8
    assert int(out.header["sform_code"]) == 2 and out.header["descrip"] == b"source scan"
    assert np.array_equal(np.asanyarray(out.dataobj), mask)
    with pytest.raises(ValueError, match="does not match"):
        write_mask(np.zeros((4, 5, 5)), src, tmp_path / "bad.nii.gz")
