"""LUNA16 (`subsetN/*.mhd` + `annotations.csv`) to a Decathlon NIfTI dataset with spherical nodule masks.

`python -m jobs.convert_luna16 LUNA_ROOT OUT [--subsets 0 1] [--annotations CSV] [--skip-empty] [--limit N]`
"""

from __future__ import annotations

import argparse
import time

from segmentation.luna16 import convert_luna16


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="LUNA16 folder with subset0/ ... subset9/ and annotations.csv")
    p.add_argument("out", help="Decathlon dataset folder to write")
    p.add_argument("--annotations", help="annotations CSV (default: ROOT/annotations.csv)")
    p.add_argument("--subsets", type=int, nargs="+", help="subset numbers to convert (default: all)")
    p.add_argument("--skip-empty", action="store_true", help="leave out scans without annotated nodules")
    p.add_argument("--limit", type=int, default=0, help="convert at most N scans (default: all)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    path = convert_luna16(args.root, args.out, args.annotations, args.subsets, args.skip_empty, args.limit)
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
