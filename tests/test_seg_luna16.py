"""MetaImage reading, world <-> voxel conversion with a non-identity direction, spheres, the converter."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from segmentation.io import list_cases, load_pair
from segmentation.luna16 import (
    MetaImage,
    convert_luna16,
    lps_to_ras_affine,
    read_mhd,
    sphere_mask,
    voxel_to_world,
    world_to_voxel,
    write_mhd,
)

# Image x runs along world -y, image y along world +x, image z along world z (a 90-degree turn), plus offsets.
DIRECTION = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
ORIGIN = np.array([-120.5, 80.25, -300.0])
SPACING = np.array([0.7, 0.8, 2.5])
UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100000000000000000000000000001"


def _image(shape=(30, 32, 12)) -> MetaImage:
    arr = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) % 2000 - 1000
    return MetaImage(arr, ORIGIN.copy(), SPACING.copy(), DIRECTION.copy())


def test_world_voxel_round_trip():
    ijk = np.array([[0, 0, 0], [3.5, 7.25, 2.0], [29, 31, 11]])
    world = voxel_to_world(ijk, ORIGIN, SPACING, DIRECTION)
    # Index (1, 0, 0) moves 0.7 mm along the first column of the direction matrix: world -y.
    assert np.allclose(voxel_to_world([1, 0, 0], ORIGIN, SPACING, DIRECTION) - ORIGIN, [0, -0.7, 0])
    assert np.allclose(world_to_voxel(world, ORIGIN, SPACING, DIRECTION), ijk)


@pytest.mark.parametrize("msb", [False, True])
def test_mhd_write_read(tmp_path, msb):
    img = _image()
    path = write_mhd(tmp_path / f"{UID}.mhd", img)
    assert "TransformMatrix = 0 -1 0 1 0 0 0 0 1" in path.read_text()  # axis directions, one after the other
    if msb:  # SimpleITK writes the machine's byte order; a big-endian file (old scanners' exports) by hand
        raw = path.with_suffix(".raw")
        raw.write_bytes(np.frombuffer(raw.read_bytes(), "<i2").astype(">i2").tobytes())
        path.write_text(path.read_text().replace("ByteOrderMSB = False", "ByteOrderMSB = True"))
        assert path.read_text().count("ByteOrderMSB = True") >= 1
    back = read_mhd(path)
    assert np.array_equal(back.array, img.array) and back.array.dtype == np.int16
    assert np.allclose(back.direction, DIRECTION) and np.allclose(back.origin, ORIGIN)
    assert np.allclose(back.spacing, SPACING)


def test_mhd_local_data_and_errors(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # (x, y, z)
    header = (
        b"ObjectType = Image\nNDims = 3\nDimSize = 2 3 4\nElementType = MET_FLOAT\n"
        b"ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n"
    )
    (tmp_path / "a.mha").write_bytes(header + arr.transpose(2, 1, 0).tobytes())
    assert np.array_equal(read_mhd(tmp_path / "a.mha").array, arr)
    (tmp_path / "b.mha").write_bytes(header + b"\x00" * 10)
    with pytest.raises(ValueError, match=r"b\.mha.*expected 96"):
        read_mhd(tmp_path / "b.mha")
    with pytest.raises(FileNotFoundError, match=r"c\.mhd"):
        read_mhd(tmp_path / "c.mhd")


def test_sphere_lands_at_the_world_centre():
    img = _image()
    centre_ijk = np.array([12.0, 20.0, 6.0])
    centre = voxel_to_world(centre_ijk, ORIGIN, SPACING, DIRECTION)
    mask = sphere_mask(img.array.shape, centre, 6.0, ORIGIN, SPACING, DIRECTION)
    assert mask[12, 20, 6] and mask.sum() > 0
    assert np.allclose(np.argwhere(mask).mean(0), centre_ijk, atol=0.3)
    # Extent along each axis: radius 3 mm / spacing.
    idx = np.argwhere(mask)
    assert idx[:, 0].max() - 12 == int(3 / 0.7) and idx[:, 2].max() - 6 == int(3 / 2.5)
    volume = mask.sum() * np.prod(SPACING)
    assert volume == pytest.approx(4 / 3 * np.pi * 27, rel=0.35)
    outside = sphere_mask(img.array.shape, centre + 1000, 6.0, ORIGIN, SPACING, DIRECTION)
    assert not outside.any()


def test_convert_luna16(tmp_path):
    root = tmp_path / "luna"
    (root / "subset0").mkdir(parents=True)
    img = _image()
    write_mhd(root / "subset0" / f"{UID}.mhd", img)
    centre = voxel_to_world([12.0, 20.0, 6.0], ORIGIN, SPACING, DIRECTION)
    (root / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n" + f"{UID},{centre[0]},{centre[1]},{centre[2]},6.0\n"
    )
    path = convert_luna16(root, tmp_path / "out", progress=False)
    assert json.loads(path.read_text())["numTraining"] == 1
    (case,) = list_cases(tmp_path / "out")
    nifti, data, label = load_pair(case)
    assert np.array_equal(data, img.array) and label[12, 20, 6] == 1
    # NIfTI world is RAS: the LPS annotation centre with x and y negated.
    ras = nifti.affine @ np.array([12.0, 20.0, 6.0, 1.0])
    assert np.allclose(ras[:3], centre * [-1, -1, 1])
    assert np.allclose(nifti.affine, lps_to_ras_affine(img))
    # Image x runs along LPS -y (anterior), image y along LPS +x (patient left).
    assert nib.aff2axcodes(nifti.affine) == ("A", "L", "S")
