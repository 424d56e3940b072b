"""CT image/label pairs: find the cases of a dataset, read them with checks, write predicted masks.

Images and labels may be NIfTI (`.nii.gz`, `.nii`), NRRD (`.nrrd`, `.seg.nrrd`, `.nhdr`), MetaImage (`.mhd` +
`.raw`, `.mha`) or a folder holding one DICOM series; `read_image` returns every format as a NIfTI image in
memory (voxels in (x, y, z) order and the RAS affine), so the rest of the pipeline is format-blind
(`segmentation.formats` has the SimpleITK side). Two layouts are understood:

- Medical Segmentation Decathlon: `ROOT/dataset.json` whose `"training"` entries are
  `{"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}` and whose `"test"` entries are paths
  (`./imagesTs/Y.nii.gz`); paths are resolved against the JSON's folder.
- Plain: `ROOT/images/NAME.nii.gz` with `ROOT/labels/NAME.nii.gz` (labels optional for prediction); any of the
  formats above, e.g. `images/NAME/` (DICOM slices) with `labels/NAME.nrrd`.

macOS resource-fork files (`._NAME.nii.gz`) are skipped in both. Every error names the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "Case",
    "DataError",
    "ImageReadError",
    "NiftiReadError",
    "DicomSeriesError",
    "CaseMismatchError",
    "LabelValueError",
    "EmptyDatasetError",
    "NIFTI_SUFFIXES",
    "IMAGE_SUFFIXES",
    "case_id_of",
    "list_cases",
    "read_nifti",
    "read_image",
    "nifti_from_array",
    "load_pair",
    "check_pair",
    "check_binary_label",
    "write_mask",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Kept equal to segmentation.formats.ITK_SUFFIXES (that module imports SimpleITK lazily; this one never does).
_ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + _ITK_SUFFIXES


class DataError(ValueError):
    """Input data that cannot be used; the message names the file."""


class ImageReadError(DataError):
    """An image file or DICOM folder that cannot be read (corrupt, truncated, missing data file, not 3-D)."""


class NiftiReadError(ImageReadError):
    """A NIfTI file that nibabel cannot read (truncated, corrupt, not NIfTI)."""


class DicomSeriesError(ImageReadError):
    """A DICOM folder that is not one regular series: several series, missing slices, uneven spacing."""


class CaseMismatchError(DataError):
    """An image and its label disagree in shape or affine."""


class LabelValueError(DataError):
    """A label volume with values other than 0 and 1."""


class EmptyDatasetError(DataError):
    """A dataset folder or list with no usable cases."""


@dataclass(frozen=True)
class Case:
    """One image (and its label, when known) on disk."""

    case_id: str
    image: Path
    label: Path | None = None


def case_id_of(path: str | Path) -> str:
    """`lung_001.nii.gz` -> `lung_001` (any image suffix, and an nnU-Net `_0000` channel suffix); a DICOM folder's
    name is its case id."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if name.endswith("_0000") else name


def _is_hidden(path: Path) -> bool:
    # `._X` are AppleDouble resource forks left by macOS archives: not NIfTI, would fail to load.
    return path.name.startswith("._") or path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """Image files of any known format, and sub-folders holding DICOM slices, sorted by name."""
    from .formats import is_dicom_dir

    found = []
    for p in sorted(folder.iterdir()):
        if _is_hidden(p):
            continue
        if (p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)) or (p.is_dir() and is_dicom_dir(p)):
            found.append(p)
    return found


def _resolve(root: Path, rel: str, json_path: Path) -> Path:
    if not isinstance(rel, str):
        raise DataError(f"{json_path}: expected a path string, found {rel!r}")
    path = (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
    if not path.exists():  # a file, or a folder of DICOM slices
        raise FileNotFoundError(f"{json_path} lists {rel!r} but {path} does not exist")
    return path


def _decathlon_cases(root: Path, split: str) -> list[Case]:
    json_path = root / "dataset.json"
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{json_path}: cannot read the dataset description ({e})") from e
    key = {"train": "training", "val": "validation", "test": "test"}[split]
    entries = meta.get(key, [])
    if not isinstance(entries, list):
        raise DataError(f"{json_path}: {key!r} must be a list, found {type(entries).__name__}")
    cases = []
    for entry in entries:
        image_rel = entry["image"] if isinstance(entry, dict) else entry
        label_rel = entry.get("label") if isinstance(entry, dict) else None
        if _is_hidden(Path(str(image_rel))):
            continue
        image = _resolve(root, image_rel, json_path)
        label = _resolve(root, label_rel, json_path) if label_rel else None
        if split != "test" and label is None:
            raise DataError(f"{json_path}: {key} entry {image_rel!r} has no 'label'")
        cases.append(Case(case_id_of(image), image, label))
    return cases


def _plain_cases(root: Path, split: str) -> list[Case]:
    images, labels = root / "images", root / "labels"
    cases = []
    for image in _image_files(images):
        cid = case_id_of(image)
        label = next((labels / f"{cid}{s}" for s in IMAGE_SUFFIXES if (labels / f"{cid}{s}").is_file()), None)
        if split == "train" and label is None:
            raise FileNotFoundError(f"{image} has no label: expected {labels / (cid + '.nii.gz')}")
        cases.append(Case(cid, image, label))
    return cases


def list_cases(root: str | Path, split: str = "train") -> list[Case]:
    """The cases of a dataset folder, sorted as listed (Decathlon) or by name (plain layout).

    Args:
        root: a Decathlon folder (with dataset.json), a plain folder (with images/ and labels/), or a folder of
            images (NIfTI, NRRD, MetaImage files or DICOM sub-folders; split "test" only: labels are not needed).
        split: "train" (image + label pairs; Decathlon `training`), "val" (Decathlon `validation`, a MONAI-style
            key that `jobs.make_phantoms` writes; the plain layout has none) or "test" (images; Decathlon `test`,
            or the plain layout's images whose labels may be missing).

    Raises:
        FileNotFoundError: the folder, or a file the dataset lists, does not exist.
        EmptyDatasetError: no case found.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if (root / "dataset.json").is_file():
        cases = _decathlon_cases(root, split)
    elif (root / "images").is_dir():
        cases = _plain_cases(root, split) if split != "val" else []
    elif split == "test":
        cases = [Case(case_id_of(p), p) for p in _image_files(root)]
    else:
        raise FileNotFoundError(
            f"{root} is neither a Decathlon dataset (no dataset.json) nor a plain one (no images/ folder)"
        )
    if not cases:
        raise EmptyDatasetError(f"no {split} cases found in {root}")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"{root}: case ids appear more than once: {dup[:5]}")
    return cases


def read_nifti(path: str | Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI file and decode its voxels now, so a truncated `.nii.gz` fails here and names the file.

    Returns:
        The image (header, affine) and its voxel array (as stored, scaled by the header's slope/intercept).

    Raises:
        FileNotFoundError: no such file.
        NiftiReadError: nibabel cannot read the header or decode the voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file {path} does not exist")
    try:
        img = nib.load(str(path))
        # nibabel reads lazily: decoding the data is where truncated gzip streams fail.
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many kinds (ImageFileError, EOFError, zlib.error, OSError, ValueError)
        raise NiftiReadError(f"cannot read NIfTI file {path}: {type(e).__name__}: {e}") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NiftiReadError(f"{path}: expected a 3-D volume, found shape {data.shape}")
    return img, data


def nifti_from_array(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """An in-memory NIfTI holding `data` ((x, y, z) order) on the RAS grid `affine`, units mm, scanner frame."""
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img


def read_image(path: str | Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Read a volume of any supported format: NIfTI, NRRD, MetaImage or a folder holding one DICOM series.

    Returns:
        (a NIfTI image carrying the RAS affine (and, for NIfTI files, the file's header), voxels in (x, y, z)
        order). For ITK formats and DICOM the geometry is converted exactly from LPS (see segmentation.formats).

    Raises:
        FileNotFoundError: no such file or folder.
        ImageReadError: an unknown suffix, a corrupt or truncated file, a `.mhd` without its data file, a DICOM
            folder that is not one regular series (DicomSeriesError); NiftiReadError for NIfTI files.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path)
    from . import formats

    if path.is_dir():
        data, affine = formats.read_dicom_series(path)
    elif name.endswith(_ITK_SUFFIXES):
        data, affine = formats.read_itk(path)
    elif not path.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    else:
        raise ImageReadError(f"{path}: unknown image format (expected a DICOM folder or one of {IMAGE_SUFFIXES})")
    return nifti_from_array(data, affine), data


def check_pair(
    image: nib.Nifti1Image,
    label: nib.Nifti1Image,
    image_path: str | Path,
    label_path: str | Path,
    atol: float = 1e-3,
) -> None:
    """Raise CaseMismatchError unless image and label share the voxel grid (shape and affine)."""
    if image.shape[:3] != label.shape[:3]:
        raise CaseMismatchError(
            f"label {label_path} has shape {tuple(label.shape[:3])} but image {image_path} has {tuple(image.shape[:3])}"
        )
    # Scanners and converters round affines differently; a millimetre-scale tolerance compares grids, not floats.
    if not np.allclose(image.affine, label.affine, atol=atol, rtol=1e-4):
        raise CaseMismatchError(
            f"label {label_path} and image {image_path} have different affines:\n{np.round(label.affine, 4)}\n"
            f"vs\n{np.round(image.affine, 4)}"
        )


def check_binary_label(label: np.ndarray, path: str | Path) -> np.ndarray:
    """The label as uint8, after checking it only holds 0 and 1 (raises LabelValueError naming the file)."""
    values = np.unique(label)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise LabelValueError(
            f"label {path} must hold only 0 (background) and 1 (nodule); found values {bad[:8].tolist()}"
            + (" and more" if bad.size > 8 else "")
        )
    return label.astype(np.uint8)


def load_pair(case: Case) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray | None]:
    """Read a case: (image NIfTI, image voxels as float32, binary label as uint8 or None), checked."""
    img, data = read_image(case.image)
    if case.label is None:
        return img, data.astype(np.float32), None
    lab, lab_data = read_image(case.label)
    check_pair(img, lab, case.image, case.label)
    return img, data.astype(np.float32), check_binary_label(lab_data, case.label)


def write_mask(mask: np.ndarray, reference: nib.Nifti1Image, path: str | Path) -> Path:
    """Write `mask` (the reference's voxel grid) as uint8 NIfTI, or NRRD/MetaImage when `path` ends so.

    NIfTI: the header is copied (qform/sform codes, units, description) so viewers overlay it on the source image;
    the data type becomes uint8 and the intensity scaling is reset. NRRD/MetaImage: the reference's affine is
    converted to ITK's LPS origin, spacing and direction (segmentation.formats.write_itk).
    """
    path = Path(path)
    if tuple(mask.shape) != tuple(reference.shape[:3]):
        raise ValueError(f"mask shape {mask.shape} does not match the reference grid {reference.shape[:3]} ({path})")
    if path.name.lower().endswith(_ITK_SUFFIXES):
        from .formats import write_itk

        return write_itk(np.asarray(mask, dtype=np.uint8), reference.affine, path)
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), reference.affine, header=header)
    out.header.set_slope_inter(1.0, 0.0)
    # Keep the source's qform/sform codes (scanner vs aligned) rather than nibabel's defaults.
    out.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    out.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(path))
    return path
