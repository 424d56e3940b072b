"""Write the job scripts from the catalog, check them, or render one from a spec.

python -m slurm --all      rewrite every checked-in script (slurm/*.sh, slurm/pbs/*.sh,
                           tests/golden/slurm/*.sh) from slurm/catalog.py and slurm/specs/site.yaml
python -m slurm --check    exit 1 and name the scripts that differ from a fresh render
python -m slurm --job unet --gpus 64 --gpus-per-node 8 --launcher horovodrun -o my_unet.sh
python -m slurm --spec my_job.yaml [--scheduler pbs] [-o FILE]
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from .catalog import SITE_FILE, SOURCE, catalog, family_spec
from .render import GENERATED_BY, ROOT, render
from .spec import SpecError, load_site, load_spec


def write_all(root: Path = ROOT) -> list[str]:
    """Write every catalog script under `root`; returns the paths whose text changed."""
    changed = []
    for rel, text in catalog().items():
        path = root / rel
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(rel)
        path.chmod(0o755)
    return changed


def check_all(root: Path = ROOT) -> list[str]:
    """Paths of catalog scripts that are missing under `root` or differ from a fresh render, each with a diff."""
    problems = []
    for rel, text in catalog().items():
        path = root / rel
        if not path.exists():
            problems.append(f"{rel}: missing")
            continue
        old = path.read_text()
        if old != text:
            diff = difflib.unified_diff(
                old.splitlines(), text.splitlines(), f"{rel} (checked in)", "rendered", n=1, lineterm=""
            )
            problems.append(f"{rel}: differs\n" + "\n".join(list(diff)[:40]))
    return problems


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m slurm",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--all", action="store_true", help="write every checked-in script from the catalog")
    what.add_argument("--check", action="store_true", help="exit 1 if a checked-in script differs from its render")
    what.add_argument("--job", help="a catalog family (unet, classifier) at --gpus")
    what.add_argument("--spec", help="a YAML file of JobSpec fields (name, command, gpus, ...)")
    p.add_argument("--gpus", type=int, help="GPUs in all (one rank per GPU)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: site.yaml's)")
    p.add_argument("--scheduler", choices=("slurm", "pbs"), help="sbatch or qsub script")
    p.add_argument("--launcher", choices=("srun", "mpirun", "horovodrun", "none"), help="how the ranks start")
    p.add_argument("--partition", help="Slurm partition or PBS queue")
    p.add_argument("--account", help="account charged")
    p.add_argument("-o", "--out", help="write the script here (default: stdout)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    if a.all:
        changed = write_all()
        print(f"slurm: {len(changed)} script(s) written" + "".join(f"\n  {c}" for c in changed))
        return 0
    if a.check:
        problems = check_all()
        for msg in problems:
            print(msg, file=sys.stderr)
        if problems:
            print(f"run `{GENERATED_BY}` and review the diff if this change is intended", file=sys.stderr)
        return 1 if problems else 0
    overrides = {
        "gpus_per_node": a.gpus_per_node,
        "scheduler": a.scheduler,
        "launcher": a.launcher,
        "partition": a.partition,
        "account": a.account,
    }
    try:
        if a.job:
            if a.gpus is None:
                raise SpecError("--job needs --gpus")
            changes = {k: v for k, v in overrides.items() if v not in (None, "") and k != "scheduler"}
            spec = family_spec(load_site(SITE_FILE), a.job, a.gpus, a.scheduler or "slurm", **changes)
            source = SOURCE
        else:
            spec = load_spec(a.spec, gpus=a.gpus, **overrides)
            source = a.spec
        if a.out:
            spec = spec.replace(script=a.out)
        text = render(spec, source)
    except (SpecError, FileNotFoundError) as e:
        print(f"slurm: error: {e}", file=sys.stderr)
        return 2
    if a.out:
        Path(a.out).write_text(text)
        Path(a.out).chmod(0o755)
        print(f"slurm: wrote {a.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
