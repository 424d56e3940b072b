"""Scaling report over run folders: `python -m jobs.scaling_report RUN_DIR... --out DIR [--predict PROFILE[,...]]`.

Writes scaling.md, scaling.csv, time_speedup.png and dice_relative.png under --out and prints the table. The model
check fits the CPU model on the real runs at --fit-ranks (default 1) and prints its error on the others
("out-of-sample error (fit on 1 rank, predicting 2 ranks): X%") against the 15% target.
"""

from __future__ import annotations

import argparse
import sys

from scaling.perfmodel import DEFAULT_GPUS, PROFILES, parse_ranks
from scaling.report import make_report
from scaling.runs import RunFolderError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.scaling_report", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", help="run folders (or folders holding run folders)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--predict",
        default="",
        help=f"profiles to predict, comma-separated: {', '.join(PROFILES)} or a .yaml/.json file",
    )
    p.add_argument("--target-dice", type=float, default=None, help="Dice for 'epochs to target' (default 0.95 x 1-GPU)")
    p.add_argument("--metric", default="dice", help="validation key reported as Dice")
    p.add_argument("--step-time", type=float, default=None, help="compute s/step on the target GPU (else scaled)")
    p.add_argument("--measured-on", default="cpu_this_machine", help="profile the runs' compute was measured on")
    p.add_argument("--grad-bytes", type=float, default=None, help="gradient bytes (default: from the checkpoint)")
    p.add_argument("--samples", type=float, default=None, help="training samples per epoch (default: the 1-GPU run)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default: the 1-GPU run)")
    p.add_argument("--gpus", default=",".join(map(str, DEFAULT_GPUS)), help="GPU counts to predict")
    p.add_argument(
        "--fit-ranks",
        default="1",
        help="world sizes of the real runs the CPU model is fitted on ('1,2', or 'all'); the others are predicted "
        "out of sample (default 1)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        fit_ranks = parse_ranks(a.fit_ranks)
        make_report(
            a.run_dirs,
            a.out,
            predict=[s for s in a.predict.split(",") if s],
            target_dice=a.target_dice,
            metric=a.metric,
            step_time=a.step_time,
            grad_bytes=a.grad_bytes,
            samples=a.samples,
            batch=a.batch,
            measured_on=a.measured_on,
            gpus=[int(g) for g in a.gpus.split(",")],
            fit_ranks=fit_ranks,
        )
    except (RunFolderError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else e  # KeyError's str() adds quotes
        print(f"scaling_report: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
