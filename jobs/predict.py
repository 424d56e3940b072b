"""Predict nodule masks with a trained U-Net: `python -m jobs.predict --checkpoint CKPT INPUT --out DIR`.

INPUT is an image (NIfTI, NRRD, MetaImage or a folder of DICOM slices) or a dataset folder (a Decathlon dataset: its
`test` list, or `--split`; `--split heldout`: the validation cases the checkpoint's training run held out; a plain
dataset's `images/`; or a folder of images). Each mask is written as `DIR/NAME_mask.nii.gz` (uint8, 1 = nodule;
`--format nrrd` or `both` for `.nrrd`, what 3D Slicer opens) on the input's voxel grid and world geometry: the
preprocessing of the checkpoint's config is applied, then undone (probabilities resampled back, axes reoriented
back). `--lung-mask` keeps only predictions inside the lungs (segmentation.lungmask: for whole CTs, where a model
trained on crops fires on soft tissue). When the input has a label (a Decathlon `training`/`validation` entry or a
plain layout's `labels/`) its Dice and the count of predicted voxels outside the label are printed and written to
`DIR/dice.csv`. Bad input exits with status 2 and names the file.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hvdtrain.checkpoint import CheckpointError
from segmentation.engine import Predictor, model_from_checkpoint, split_cases
from segmentation.formats import is_dicom_dir
from segmentation.io import (
    IMAGE_SUFFIXES,
    Case,
    DataError,
    case_id_of,
    check_binary_label,
    check_pair,
    list_cases,
    read_image,
    write_mask,
)
from segmentation.lungmask import axial_axis, lung_mask
from segmentation.metrics import DiceMetric, write_per_case_csv
from segmentation.postprocess import POSTPROCESS
from segmentation.preprocess import spacing_of
from segmentation.validate import check_volume

SUFFIXES = {"nifti": (".nii.gz",), "nrrd": (".nrrd",), "both": (".nii.gz", ".nrrd")}


def _cases(path: Path, split: str, run_config: dict | None = None) -> list[Case]:
    if (path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)) or is_dicom_dir(path):
        return [Case(case_id_of(path), path)]
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if split == "heldout":  # the validation cases the checkpoint's run held out, drawn as jobs.train_unet drew them
        cfg = run_config or {}
        if "val_fraction" not in cfg:
            raise DataError("--split heldout: the checkpoint's config has no split settings (val_fraction)")
        return split_cases(path, cfg["val_fraction"], cfg.get("split_seed", 0), cfg.get("split_group", ""))[1]
    return list_cases(path, split)


def _checked_label(case: Case) -> np.ndarray | None:
    """The case's label checked as training checks it (the image's grid, finite, 0/1), or None."""
    if case.label is None:
        return None
    image, _ = read_image(case.image)
    label_img, label = read_image(case.label)
    check_pair(image, label_img, case.image, case.label)  # same grid, or a CaseMismatchError naming both
    check_volume(label, label_img.affine, case.label, "label")
    return check_binary_label(label, case.label)


def _score(metric: DiceMetric, case: Case, label: np.ndarray, mask: np.ndarray) -> str:
    """Dice and the predicted voxels outside the label (the false positives a lung mask should remove)."""
    dice = metric.update(case.case_id, mask, label > 0)
    outside = metric.rows[-1]["fp"]
    return (
        "; Dice "
        + ("n/a (empty ground truth)" if math.isnan(dice) else f"{dice:.4f}")
        + f", {outside} outside the label"
    )


def _predict_case(
    predictor: Predictor, case: Case, args: argparse.Namespace, out: Path, metric: DiceMetric
) -> list[Path]:
    """Predict, restrict to the lungs on request, write the mask file(s) and print one line."""
    t0 = time.perf_counter()
    label = _checked_label(case)  # before the prediction: a bad label stops the job before any mask is written
    nifti, mask = predictor.predict_file(case.image)
    line = f"{case.case_id}: {int(mask.sum())} nodule voxels"
    if args.lung_mask:
        spacing = spacing_of(nifti.affine)
        lungs = lung_mask(np.asanyarray(nifti.dataobj), spacing, axial_axis(nifti.affine))
        mask = (mask & lungs).astype(np.uint8)
        line += f", {int(mask.sum())} inside the lung mask ({lungs.sum() * np.prod(spacing) / 1e6:.2f} L)"
    paths = [write_mask(mask, nifti, out / f"{case.case_id}{args.suffix}{s}") for s in SUFFIXES[args.format]]
    line += f" -> {', '.join(map(str, paths))} ({time.perf_counter() - t0:.1f} s)"
    if label is not None:
        line += _score(metric, case, label, mask)
    print(line, flush=True)
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="image (NIfTI, NRRD, MetaImage, DICOM folder) or dataset folder")
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt written by jobs.train_unet")
    p.add_argument("--out", required=True, help="output folder for NAME_mask.nii.gz")
    p.add_argument("--format", default="nifti", choices=tuple(SUFFIXES), help="mask files: .nii.gz, .nrrd or both")
    p.add_argument("--lung-mask", action="store_true", help="keep predictions inside an HU-threshold lung mask")
    p.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (default: the checkpoint's)")
    p.add_argument(
        "--postprocess",
        choices=POSTPROCESS,
        help="mask post-processing (default: the checkpoint's; use none on whole CTs: the centre is not a nodule)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="average the 8 mirrorings of X, Y, Z (8x the time; default: the checkpoint's)",
    )
    p.add_argument("--threshold", type=float, help="probability threshold of the mask (default: the checkpoint's)")
    p.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test", "heldout"),
        help="dataset list (default: test); heldout: the validation cases the checkpoint's training run held out "
        "(its --val-fraction, --split-seed, --split-group), scored here on their original grid",
    )
    p.add_argument("--suffix", default="_mask", help="appended to the case name (default: _mask; '' keeps it)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    predictor = model_from_checkpoint(args.checkpoint, device, args.overlap)
    if args.postprocess:
        predictor.postprocess = args.postprocess
    if args.tta is not None:
        predictor.tta_flips = (0, 1, 2) if args.tta else ()
    if args.threshold is not None:
        if not 0.0 < args.threshold < 1.0:
            p.error(f"--threshold must be in (0, 1), got {args.threshold}")
        predictor.threshold = args.threshold
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metric = DiceMetric()
    written = []
    for case in _cases(Path(args.input), args.split, predictor.run_config):
        written += _predict_case(predictor, case, args, out, metric)
    if metric.rows:
        totals = dict(zip(metric.fields, metric.stats.tolist()))
        summary = metric.finalize(totals)
        write_per_case_csv(metric.rows, out / "dice.csv")
        print(
            f"mean Dice {summary['dice']:.4f} over {summary['scored_cases']} case(s) "
            f"({summary['empty_cases']} with empty ground truth, {summary['empty_fp_cases']} of them with false "
            f"positives); {int(totals['fp'])} predicted voxels outside the labels; per case: {out / 'dice.csv'}"
        )
    print(f"wrote {len(written)} mask(s) to {out}")
    return written


def cli(argv: list[str] | None = None) -> int:
    """`main` with bad input reported as one line naming the file, and exit status 2."""
    try:
        main(argv)
    except (DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
