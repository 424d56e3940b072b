"""Predict nodule masks with a trained U-Net: `python -m jobs.predict --checkpoint CKPT INPUT --out DIR`.

INPUT is a NIfTI file or a folder (a Decathlon dataset: its `test` list, or `--split`; a plain dataset's
`images/`; or a folder of `.nii.gz` files). Each mask is written as `DIR/NAME_mask.nii.gz` (uint8, 1 = nodule)
with the input's affine and header, on the input's voxel grid: the preprocessing of the checkpoint's config is
applied, then undone (probabilities resampled back, axes reoriented back). When the input has a label (a
Decathlon `training`/`validation` entry or a plain layout's `labels/`) its Dice is printed and written to
`DIR/dice.csv`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from segmentation.engine import model_from_checkpoint
from segmentation.io import (
    NIFTI_SUFFIXES,
    Case,
    case_id_of,
    check_binary_label,
    check_pair,
    list_cases,
    read_nifti,
    write_mask,
)
from segmentation.metrics import DiceMetric, write_per_case_csv
from segmentation.validate import check_volume


def _cases(path: Path, split: str) -> list[Case]:
    if path.is_file() and path.name.endswith(NIFTI_SUFFIXES):
        return [Case(case_id_of(path), path)]
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    return list_cases(path, split)


def _checked_label(case: Case):  # noqa: ANN202
    """The case's label checked as training checks it (grid of the image, finite, 0/1), or None."""
    if case.label is None:
        return None
    image, _ = read_nifti(case.image)
    label_img, label = read_nifti(case.label)
    check_pair(image, label_img, case.image, case.label)
    check_volume(label, label_img.affine, case.label, "label")
    return check_binary_label(label, case.label)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="NIfTI file or dataset folder")
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt written by jobs.train_unet")
    p.add_argument("--out", required=True, help="output folder for NAME_mask.nii.gz")
    p.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="dataset list (default: test)")
    p.add_argument("--suffix", default="_mask", help="appended to the case name (default: _mask; '' keeps it)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    predictor = model_from_checkpoint(args.checkpoint, device, args.overlap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metric = DiceMetric()
    written = []
    for case in _cases(Path(args.input), args.split):
        t0 = time.perf_counter()
        label = _checked_label(case)  # before the prediction: a bad label stops the job before any mask is written
        nifti, mask = predictor.predict_file(case.image)
        path = write_mask(mask, nifti, out / f"{case.case_id}{args.suffix}.nii.gz")
        written.append(path)
        line = f"{case.case_id}: {int(mask.sum())} nodule voxels -> {path} ({time.perf_counter() - t0:.1f} s)"
        if label is not None:
            dice = metric.update(case.case_id, mask, label)
            line += "; Dice " + ("n/a (empty ground truth)" if math.isnan(dice) else f"{dice:.4f}")
        print(line, flush=True)
    if metric.rows:
        summary = metric.finalize(dict(zip(metric.fields, metric.stats.tolist())))
        write_per_case_csv(metric.rows, out / "dice.csv")
        print(
            f"mean Dice {summary['dice']:.4f} over {summary['scored_cases']} case(s) "
            f"({summary['empty_cases']} with empty ground truth, {summary['empty_fp_cases']} of them with false "
            f"positives); per case: {out / 'dice.csv'}"
        )
    print(f"wrote {len(written)} mask(s) to {out}")
    return written


if __name__ == "__main__":
    main()
