"""Write small CT DICOM series with pydicom for the tests (real files: SimpleITK/GDCM reads them as a scanner's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def slice_position(origin, orientation, spacing, k: int) -> np.ndarray:
    """ImagePositionPatient (LPS mm) of slice k: the origin moved k steps along row x column."""
    iop = np.asarray(orientation, float)
    return np.asarray(origin, float) + k * spacing[2] * np.cross(iop[:3], iop[3:])


def write_series(
    folder: str | Path,
    hu: np.ndarray,
    spacing=(0.7, 0.8, 2.5),
    origin=(-120.0, -90.5, -300.0),
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    positions: list[np.ndarray] | None = None,
    names: list[str] | None = None,
) -> list[Path]:
    """Write `hu` ((x, y, z) = (column, row, slice)) as one file per slice, stored as (HU - intercept) / slope.

    `spacing` is (column spacing, row spacing, slice step); `positions` overrides the slice positions (gaps,
    uneven steps); file names are shuffled-looking by default so readers must sort by position.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    stored = np.round((np.asarray(hu, float) - intercept) / slope).astype(np.uint16)
    n = hu.shape[2]
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "TEST"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.InstanceNumber = k + 1
        pos = positions[k] if positions is not None else slice_position(origin, orientation, spacing, k)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows of columns
        name = names[k] if names is not None else f"IM{(k * 7919) % 10007:05d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
