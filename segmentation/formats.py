"""NRRD, MetaImage and DICOM series through SimpleITK, as (voxels in (x, y, z) order, NIfTI RAS affine).

ITK images live in the LPS world frame: `world_lps = origin + D @ (spacing * ijk)` where column `a` of the direction
matrix D is the direction of image axis `a` and `ijk` runs along (x, y, z) = (column, row, slice). NIfTI affines
map to RAS, so `affine = diag(-1, -1, 1, 1) @ [D * spacing | origin]`; the inverse (for writing) negates the same
rows. The voxel array from `GetArrayFromImage` is (z, y, x) and is transposed to (x, y, z), the NIfTI order, so
`array[i, j, k]` sits at `affine @ (i, j, k, 1)` for every format and the rest of the pipeline stays format-blind.

DICOM folders are checked before reading (one series, no gap or uneven step between slice positions, one size and
orientation); ITK then reads them sorted by position with the rescale slope/intercept applied (HU).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from hvdtrain.atomic import write_atomic

from .io import DicomSeriesError, ImageReadError

__all__ = [
    "ITK_SUFFIXES",
    "itk_affine",
    "itk_geometry",
    "read_itk",
    "write_itk",
    "is_dicom_dir",
    "dicom_files",
    "read_dicom_series",
]

# `.seg.nrrd` (3D Slicer segmentations) before `.nrrd` so case names lose the whole suffix.
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_MET_BYTES = {"CHAR": 1, "UCHAR": 1, "SHORT": 2, "USHORT": 2, "INT": 4, "UINT": 4, "LONG": 8, "ULONG": 8}
_MET_BYTES.update({"FLOAT": 4, "DOUBLE": 8, "LONG_LONG": 8, "ULONG_LONG": 8})


def _sitk():
    import SimpleITK as sitk  # imported here: NIfTI-only use never needs it

    return sitk


def itk_affine(image) -> np.ndarray:
    """The 4x4 NIfTI (RAS) affine of a 3-D SimpleITK image."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # row-major: column a = axis a
    m = np.eye(4)
    m[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)[None, :]
    m[:3, 3] = image.GetOrigin()
    return LPS_RAS @ m


def itk_geometry(affine: np.ndarray, path: str | Path = "") -> tuple[list[float], list[float], list[float]]:
    """(origin, spacing, direction row-major) in LPS for a NIfTI affine; raises ImageReadError on a sheared one."""
    m = LPS_RAS @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ImageReadError(f"{path}: affine has a zero-length axis: {np.round(affine, 4).tolist()}")
    direction = m[:3, :3] / spacing[None, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ImageReadError(f"{path}: a sheared affine cannot be stored as ITK geometry: {np.round(affine, 4)}")
    return m[:3, 3].tolist(), spacing.tolist(), direction.ravel().tolist()


def _squeeze_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """(z, y, x[, 1]) from ITK to (x, y, z); a 4-D or multi-component volume is an error."""
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ImageReadError(
            f"{path}: expected a 3-D volume, found shape {array.shape[::-1]} (x, y, z[, components]); "
            "a multi-layer Slicer segmentation must be exported as a labelmap"
        )
    return np.ascontiguousarray(array.transpose(2, 1, 0))


def _check_metaimage(path: Path) -> None:
    """Name a missing or short data file (ITK says only 'cannot be read ... No such file or directory')."""
    fields, offset = {}, 0
    with open(path, "rb") as f:
        for raw in f:
            offset += len(raw)
            key, _, value = raw.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile" or offset > 65536:
                break
    name = fields.get("ElementDataFile", "")
    if not name or name.startswith("LIST") or "%" in name:
        return  # no header, or slices in several files: ITK's own message
    data = path if name == "LOCAL" else path.parent / name
    if not data.is_file():
        raise ImageReadError(f"{path}: its data file {data} does not exist (copy the .raw next to the .mhd)")
    try:
        etype = fields.get("ElementType", "").removeprefix("MET_")
        need = int(np.prod([int(v) for v in fields.get("DimSize", "").split()])) * _MET_BYTES[etype]
    except (KeyError, ValueError):
        return
    have = data.stat().st_size - (offset if name == "LOCAL" else 0)
    if fields.get("CompressedData", "False").lower() != "true" and have < need:
        raise ImageReadError(f"{path}: data file {data} holds {have} bytes of voxels, expected {need}")


def read_itk(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NRRD (`.nrrd`, `.seg.nrrd`, `.nhdr`) or MetaImage (`.mhd` + `.raw`, `.mha`) volume.

    Returns:
        (voxels in (x, y, z) order with the file's data type, 4x4 RAS affine).

    Raises:
        FileNotFoundError: no such file.
        ImageReadError: unreadable, corrupt or truncated file, missing `.raw`, not a 3-D volume.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    if path.suffix.lower() in (".mhd", ".mha"):
        _check_metaimage(path)
    sitk = _sitk()
    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1]
        raise ImageReadError(f"cannot read {path}: {reason}") from e
    if image.GetDimension() != 3:
        raise ImageReadError(f"{path}: expected a 3-D volume, found {image.GetDimension()}-D size {image.GetSize()}")
    return _squeeze_3d(array, path), itk_affine(image)


def write_itk(array: np.ndarray, affine: np.ndarray, path: str | Path, compress: bool = True) -> Path:
    """Write `array` ((x, y, z) order) on the grid of `affine` as NRRD or MetaImage, chosen by the suffix.

    Single-file formats are written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    sitk = _sitk()
    origin, spacing, direction = itk_geometry(affine, path)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.lower().endswith(".mhd"):  # the header names its .raw: no temporary name
        sitk.WriteImage(image, str(path), compress)
        return path
    suffix = next(s for s in ITK_SUFFIXES if path.name.lower().endswith(s))
    return write_atomic(path, lambda tmp: sitk.WriteImage(image, str(tmp), compress), suffix)


def is_dicom_dir(folder: str | Path) -> bool:
    """True when `folder` directly holds at least one DICOM file (the 'DICM' marker at byte 128)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            with open(p, "rb") as f:
                if f.read(132)[128:132] == b"DICM":
                    return True
    return False


def dicom_files(folder: Path) -> dict[str, list[tuple[Path, object]]]:
    """{SeriesInstanceUID: [(file, header), ...]} for the DICOM files of `folder` (other files are ignored)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # LIDC folders hold the readers' XML beside the slices
        except Exception as e:  # truncated or corrupt DICOM: pydicom raises several kinds
            raise ImageReadError(f"cannot read DICOM file {p}: {type(e).__name__}: {e}") from e
        if "SeriesInstanceUID" not in ds:
            raise ImageReadError(f"DICOM file {p} has no SeriesInstanceUID (truncated or not an image)")
        series[str(ds.SeriesInstanceUID)].append((p, ds))
    return dict(series)


def _bad_slice(files: list[Path]) -> str:
    """The first slice ITK cannot read on its own, with ITK's reason (only called after the series failed)."""
    sitk = _sitk()
    for p in files:
        try:
            sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        except RuntimeError as e:
            return f"{p}: {str(e).strip().splitlines()[-1]}"
    return "no single slice fails on its own"


def _sorted_slices(folder: Path, slices: list[tuple[Path, object]]) -> list[Path]:
    """The slice files sorted along the slice normal, after checking they form one regular grid."""
    first = slices[0][1]
    for p, ds in slices:
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if getattr(ds, key, None) is None:
                raise DicomSeriesError(f"{p}: DICOM slice without {key}; cannot place it in the volume")
        for key in ("ImageOrientationPatient", "PixelSpacing"):
            if not np.allclose(np.asarray(getattr(ds, key), float), np.asarray(getattr(first, key), float), atol=1e-4):
                raise DicomSeriesError(f"{folder}: {key} of {p.name} differs from {slices[0][0].name}")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise DicomSeriesError(
                f"{folder}: {p.name} is {ds.Rows}x{ds.Columns}, {slices[0][0].name} is {first.Rows}x{first.Columns}"
            )
    if len(slices) < 2:
        raise DicomSeriesError(f"{folder}: a single DICOM slice ({slices[0][0].name}) is not a 3-D volume")
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, float)) for _, ds in slices])
    order = np.argsort(pos, kind="stable")
    pos, files = pos[order], [slices[i][0] for i in order]
    steps = np.diff(pos)
    step = float(np.median(steps))
    for i, d in enumerate(steps):
        if d < 1e-3:
            raise DicomSeriesError(f"{folder}: {files[i].name} and {files[i + 1].name} share position {pos[i]:.3f} mm")
        if abs(d - step) > max(0.01 * step, 1e-3):
            what = "missing slice(s)" if d > 1.5 * step else "inconsistent slice spacing"
            raise DicomSeriesError(
                f"{folder}: {what}: {d:.3f} mm between {files[i].name} ({pos[i]:.3f} mm) and "
                f"{files[i + 1].name} ({pos[i + 1]:.3f} mm), {step:.3f} mm elsewhere"
            )
    return files


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a folder holding one DICOM series: (HU voxels in (x, y, z) order, 4x4 RAS affine).

    Raises:
        FileNotFoundError: no such folder.
        DicomSeriesError: no DICOM file, several series, a gap or uneven step between slices, mixed sizes.
        ImageReadError: a corrupt slice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM folder {folder} does not exist")
    series = dicom_files(folder)
    if not series:
        raise DicomSeriesError(f"{folder}: no DICOM files")
    if len(series) > 1:
        found = ", ".join(f"{uid} ({len(s)} files)" for uid, s in series.items())
        raise DicomSeriesError(f"{folder} holds {len(series)} DICOM series; put each in its own folder: {found}")
    files = _sorted_slices(folder, next(iter(series.values())))
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    try:
        image = reader.Execute()  # GDCM applies RescaleSlope/RescaleIntercept
    except RuntimeError as e:
        raise ImageReadError(f"cannot read the DICOM series in {folder}: {_bad_slice(files)}") from e
    return _squeeze_3d(sitk.GetArrayFromImage(image), folder), itk_affine(image)
