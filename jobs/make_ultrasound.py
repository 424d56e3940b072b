"""Write a synthetic BUSI-like breast-ultrasound dataset (for tests and the demo).

python -m jobs.make_ultrasound OUT [--n-per-class 40] [--size 128] [--seed 0]
"""

from __future__ import annotations

import argparse

from classification.synthetic import generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (ROOT/<class>/*.png with *_mask.png beside)")
    p.add_argument("--n-per-class", type=int, default=40, help="average images per class (BUSI proportions)")
    p.add_argument("--size", type=int, default=128, help="image width in pixels (heights vary 75-100 %%)")
    p.add_argument("--seed", type=int, default=0, help="the dataset is a function of the seed and the sizes")
    p.add_argument("--dup-fraction", type=float, default=0.1, help="share of near-duplicate images per class")
    args = p.parse_args(argv)
    info = generate(args.out, args.n_per_class, args.size, args.seed, args.dup_fraction)
    counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
    print(
        f"wrote {sum(info['counts'].values())} images ({counts}) to {args.out}: "
        f"{len(info['duplicates'])} near-duplicates, {len(info['second_lesion'])} with a second lesion mask"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
