"""NRRD, MetaImage and DICOM in, NIfTI and NRRD out: exact world coordinates through round trips, named errors."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segmentation.io import (
    CaseMismatchError,
    DataError,
    DicomSeriesError,
    ImageReadError,
    case_id_of,
    list_cases,
    load_pair,
    read_image,
    write_mask,
)
from tests.dicom_series import slice_position, write_series

# An oblique grid: image x along LPS (0.6, 0.8, 0), y along (-0.8, 0.6, 0), z along LPS z; odd shape and spacing.
DIRECTION = (0.6, -0.8, 0.0, 0.8, 0.6, 0.0, 0.0, 0.0, 1.0)  # row-major, column a = axis a
ORIGIN = (-121.25, 37.5, -301.0)
SPACING = (0.7, 0.9, 2.5)
SHAPE = (11, 9, 7)  # (x, y, z)


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, SHAPE).astype(np.int16)


def _itk_image(array_xyz: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    img.SetOrigin(ORIGIN)
    img.SetSpacing(SPACING)
    img.SetDirection(DIRECTION)
    return img


def _ras(lps) -> np.ndarray:
    return np.asarray(lps, float) * [-1, -1, 1]


VOXELS = [(0, 0, 0), (3, 5, 2), (10, 8, 6)]


@pytest.mark.parametrize("name", ["ct.nrrd", "ct.seg.nrrd", "ct.mhd", "ct.mha", "ct.nhdr"])
def test_itk_formats_read_with_exact_world_coordinates(tmp_path, name):
    vol = _volume()
    src = _itk_image(vol)
    sitk.WriteImage(src, str(tmp_path / name))  # written by ITK itself, not by our writer
    nifti, data = read_image(tmp_path / name)
    assert data.shape == SHAPE and np.array_equal(data, vol)
    for ijk in VOXELS:
        world = nifti.affine @ np.array([*ijk, 1.0])
        # ITK's own index -> physical point (LPS), sign-flipped to RAS: the same point to 1e-9 mm.
        assert np.allclose(world[:3], _ras(src.TransformIndexToPhysicalPoint(ijk)), atol=1e-9)
        assert data[ijk] == src.GetPixel(ijk)
    assert case_id_of(tmp_path / name) == "ct"


@pytest.mark.parametrize("out_name", ["m.nii.gz", "m.nrrd", "m.seg.nrrd", "m.mha"])
def test_mask_round_trip_keeps_the_grid(tmp_path, out_name):
    sitk.WriteImage(_itk_image(_volume()), str(tmp_path / "ct.nrrd"))
    nifti, data = read_image(tmp_path / "ct.nrrd")
    mask = (data > 500).astype(np.uint8)
    path = write_mask(mask, nifti, tmp_path / "out" / out_name)
    back_nifti, back = read_image(path)
    assert np.array_equal(back, mask) and back.dtype == np.uint8
    # NIfTI stores the affine as float32: 1e-4 mm; NRRD/MetaImage keep doubles.
    assert np.allclose(back_nifti.affine, nifti.affine, atol=1e-4 if out_name.endswith(".nii.gz") else 1e-9)
    if not out_name.endswith(".nii.gz"):
        img = sitk.ReadImage(str(path))
        assert np.allclose(img.GetOrigin(), ORIGIN) and np.allclose(img.GetSpacing(), SPACING)
        assert np.allclose(img.GetDirection(), DIRECTION)
        k = tuple(int(v) for v in np.argwhere(mask)[0])
        assert img.GetPixel(k) == 1
    else:
        ras = nib.load(str(path)).affine @ np.array([3, 5, 2, 1.0])
        assert np.allclose(ras[:3], _ras(_itk_image(_volume()).TransformIndexToPhysicalPoint((3, 5, 2))), atol=1e-4)


def test_nifti_source_written_as_nrrd(tmp_path):
    affine = np.array([[-0.8, 0, 0, 100.0], [0, 0.75, 0, -50.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 4), np.int16), affine), str(tmp_path / "a.nii.gz"))
    nifti, data = read_image(tmp_path / "a.nii.gz")
    mask = np.zeros(data.shape, np.uint8)
    mask[1, 2, 3] = 1
    img = sitk.ReadImage(str(write_mask(mask, nifti, tmp_path / "a.nrrd")))
    assert img.GetPixel((1, 2, 3)) == 1
    # RAS (100 - 0.8, -50 + 1.5, 10 + 6) is LPS (-99.2, 48.5, 16).
    assert np.allclose(img.TransformIndexToPhysicalPoint((1, 2, 3)), (-99.2, 48.5, 16.0))


@pytest.mark.parametrize(
    "orientation", [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (0.6, 0.8, 0.0, 0.0, 0.0, -1.0)]
)
def test_dicom_series_sorted_rescaled_and_placed(tmp_path, orientation):
    hu = np.random.default_rng(1).integers(-1000, 2000, (9, 7, 6)).astype(float)
    spacing, origin = (0.7, 0.8, 2.5), (-120.0, -90.5, -300.0)
    write_series(tmp_path / "ct", hu, spacing, origin, orientation, slope=2.0, intercept=-1024.0)
    nifti, data = read_image(tmp_path / "ct")
    assert np.array_equal(data, 2 * np.round((hu + 1024) / 2) - 1024)  # stored / slope, rescaled back
    iop = np.asarray(orientation)
    for i, j, k in [(0, 0, 0), (4, 3, 2), (8, 6, 5)]:
        # DICOM: column i moves along the row direction by the column spacing, row j along the column direction.
        lps = slice_position(origin, orientation, spacing, k) + i * spacing[0] * iop[:3] + j * spacing[1] * iop[3:]
        assert np.allclose(nifti.affine @ [i, j, k, 1.0], [*_ras(lps), 1.0], atol=1e-5)
    assert case_id_of(tmp_path / "ct") == "ct"


def test_dicom_mask_written_on_the_input_grid(tmp_path):
    hu = np.random.default_rng(2).integers(-1000, 400, (8, 6, 5)).astype(float)
    write_series(tmp_path / "ct", hu, orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    nifti, data = read_image(tmp_path / "ct")
    mask = (data > 0).astype(np.uint8)
    for name in ("m.nii.gz", "m.nrrd"):
        back_nifti, back = read_image(write_mask(mask, nifti, tmp_path / name))
        assert np.array_equal(back, mask) and np.allclose(back_nifti.affine, nifti.affine, atol=1e-4)


def test_dicom_errors_name_the_folder_or_file(tmp_path):
    hu = np.zeros((6, 5, 6))
    write_series(tmp_path / "two", hu[..., :3], names=["a1.dcm", "a2.dcm", "a3.dcm"])
    write_series(tmp_path / "two", hu[..., :3], names=["b1.dcm", "b2.dcm", "b3.dcm"])
    with pytest.raises(DicomSeriesError, match=r"two holds 2 DICOM series"):
        read_image(tmp_path / "two")
    origin, iop, sp = np.array([0.0, 0.0, 0.0]), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.7, 0.8, 2.5)
    gap = [slice_position(origin, iop, sp, k) for k in (0, 1, 2, 4, 5, 6)]
    write_series(tmp_path / "gap", hu, sp, origin, iop, positions=gap)
    with pytest.raises(DicomSeriesError, match=r"gap: missing slice\(s\): 5\.000 mm between .* 2\.500 mm elsewhere"):
        read_image(tmp_path / "gap")
    uneven = [np.array([0, 0, z]) for z in (0.0, 2.5, 5.0, 7.5, 9.0, 11.5)]
    write_series(tmp_path / "uneven", hu, sp, origin, iop, positions=uneven)
    with pytest.raises(DicomSeriesError, match=r"uneven: inconsistent slice spacing: 1\.500 mm"):
        read_image(tmp_path / "uneven")
    files = write_series(tmp_path / "corrupt", hu)
    files[2].write_bytes(files[2].read_bytes()[:200])  # cut inside the header
    with pytest.raises(ImageReadError, match=files[2].name):
        read_image(tmp_path / "corrupt")
    files = write_series(tmp_path / "cut", hu)
    files[3].write_bytes(files[3].read_bytes()[:-40])  # cut inside the pixels
    with pytest.raises(ImageReadError, match=files[3].name):
        read_image(tmp_path / "cut")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no slices here")
    with pytest.raises(DicomSeriesError, match="no DICOM files"):
        read_image(tmp_path / "empty")


def test_itk_errors_name_the_file(tmp_path):
    sitk.WriteImage(_itk_image(_volume()), str(tmp_path / "ct.mhd"))
    (tmp_path / "ct.raw").unlink()
    with pytest.raises(ImageReadError, match=r"ct\.mhd: its data file .*ct\.raw does not exist"):
        read_image(tmp_path / "ct.mhd")
    (tmp_path / "junk.nrrd").write_bytes(b"this is not an image" * 10)
    with pytest.raises(ImageReadError, match=r"junk\.nrrd"):
        read_image(tmp_path / "junk.nrrd")
    sitk.WriteImage(_itk_image(_volume()), str(tmp_path / "cut.nrrd"), True)
    data = (tmp_path / "cut.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[: len(data) - 300])
    with pytest.raises(ImageReadError, match=r"cut\.nrrd"):
        read_image(tmp_path / "cut.nrrd")
    (tmp_path / "x.png").write_bytes(gzip.compress(b"x"))
    with pytest.raises(ImageReadError, match=r"x\.png: unknown image format"):
        read_image(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match=r"nothere\.nrrd"):
        read_image(tmp_path / "nothere.nrrd")


def test_layouts_accept_every_format(tmp_path):
    vol = _volume()
    lab = (vol > 800).astype(np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    sitk.WriteImage(_itk_image(vol), str(tmp_path / "images" / "a.nrrd"))
    sitk.WriteImage(_itk_image(lab), str(tmp_path / "labels" / "a.seg.nrrd"))
    sitk.WriteImage(_itk_image(vol), str(tmp_path / "images" / "b.mhd"))
    sitk.WriteImage(_itk_image(lab), str(tmp_path / "labels" / "b.mha"))
    write_series(tmp_path / "images" / "c", vol.astype(float))
    nifti_c, _ = read_image(tmp_path / "images" / "c")
    write_mask(lab, nifti_c, tmp_path / "labels" / "c.nii.gz")
    cases = list_cases(tmp_path)
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    for case in cases:
        _, data, label = load_pair(case)
        assert np.array_equal(data, vol) and np.array_equal(label, lab)
    # The Decathlon list may name DICOM folders and NRRD labels too.
    entries = [
        {"image": f"./images/{n}", "label": f"./labels/{m}"} for n, m in (("a.nrrd", "a.seg.nrrd"), ("c", "c.nii.gz"))
    ]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": entries, "test": ["./images/c"]}))
    assert [c.case_id for c in list_cases(tmp_path)] == ["a", "c"]
    assert [c.image.name for c in list_cases(tmp_path, "test")] == ["c"]


def test_label_grid_differs_from_image(tmp_path):
    vol = _volume()
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    sitk.WriteImage(_itk_image(vol), str(tmp_path / "images" / "a.nrrd"))
    lab = _itk_image((vol > 800).astype(np.uint8))
    lab.SetOrigin((ORIGIN[0] + 5.0, ORIGIN[1], ORIGIN[2]))  # a Slicer segmentation cropped or moved
    sitk.WriteImage(lab, str(tmp_path / "labels" / "a.seg.nrrd"))
    with pytest.raises(CaseMismatchError, match=r"labels/a\.seg\.nrrd and image .*images/a\.nrrd have different"):
        load_pair(list_cases(tmp_path)[0])
    small = _itk_image((vol > 800).astype(np.uint8)[:, :, :5])
    sitk.WriteImage(small, str(tmp_path / "labels" / "a.seg.nrrd"))
    with pytest.raises(CaseMismatchError, match=r"a\.seg\.nrrd has shape \(11, 9, 5\)"):
        load_pair(list_cases(tmp_path)[0])
    assert issubclass(CaseMismatchError, DataError)


def test_preprocessing_cache_reads_dicom_and_nrrd(tmp_path):
    from segmentation.io import Case
    from segmentation.preprocess import PreprocessParams, preprocess_dataset

    hu = np.random.default_rng(3).integers(-1000, 400, (8, 6, 5)).astype(float)
    files = write_series(tmp_path / "ct", hu)
    nifti, _ = read_image(tmp_path / "ct")
    write_mask((hu > 0).astype(np.uint8), nifti, tmp_path / "ct_label.nrrd")
    case = Case("ct", tmp_path / "ct", tmp_path / "ct_label.nrrd")
    (entry,) = preprocess_dataset([case], tmp_path / "cache", PreprocessParams())
    img, lab = entry.arrays()
    # DICOM columns run to the patient's left and rows to posterior (LPS): RAS canonical order flips both.
    ras = np.flip(hu, (0, 1))
    assert img.shape == hu.shape and np.array_equal(lab, (ras > 0).astype(np.uint8))
    assert np.allclose(img, (np.clip(ras, -1000, 400) + 1000) / 1400, atol=1e-6)
    write_series(tmp_path / "ct", hu + 1, names=[f.name for f in files])  # slices replaced in place
    (again,) = preprocess_dataset([case], tmp_path / "cache", PreprocessParams())
    assert again.image != entry.image  # a new cache entry, not the stale one
