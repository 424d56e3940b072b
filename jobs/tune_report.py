"""Report an Optuna study: the best trial as a trainer config (best.yaml), a summary, and plots.

    python -m jobs.tune_report --study cls_demo --storage URL --out runs/tune/cls_demo/report
    python -m jobs.train_classifier --config runs/tune/cls_demo/report/best.yaml --run-dir runs/cls_best

Writes best.yaml, best_meta.json, trials.csv, report.md and history.png, importances.png, parallel.png,
intermediate.png (optuna.visualization.matplotlib). --storage takes what jobs.tune takes; without it, the SQLite
file in the study folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from tuning.report import ReportError, summary_line, write_report
from tuning.study import open_storage, parse_storage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.tune_report", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="as for jobs.tune (default: sqlite in the study folder)")
    p.add_argument("--study-dir", help="the study folder (default: runs/tune/<study>)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    spec = parse_storage(args.storage, args.study_dir or Path("runs") / "tune" / args.study)
    path = spec.url if spec.kind == "journal" else spec.url.split("sqlite:///", 1)[1] if spec.is_sqlite else ""
    if path and not Path(path).is_file():  # opening would create an empty storage
        print(f"tune_report: error: storage file {path} does not exist", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=args.study, storage=open_storage(spec, heartbeat_interval=0))
        out = write_report(study, Path(args.out))
    except KeyError:
        print(f"tune_report: error: no study {args.study!r} in {spec.describe()}", file=sys.stderr)
        return 2
    except ReportError as e:
        print(f"tune_report: error: {e}", file=sys.stderr)
        return 1
    print(summary_line(study))
    print(f"best trial {out['trial']} ({out['value']:.4f}): {out['best']} (meta {out['meta']})")
    for name, status in out["plots"].items():
        print(f"  {Path(args.out) / name}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
