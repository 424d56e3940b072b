"""Slurm and PBS job scripts rendered from one spec (`python -m slurm --all`), 1 to 64 GPUs.

`JobSpec` holds what a job needs and runs; `render` turns it into an sbatch or qsub script; `catalog` lists the
checked-in scripts (U-Net and classifier at 1-64 GPUs, the demo CPU job, the Optuna array, the scaling sweep).
"""

from .spec import JobSpec, SpecError, load_site, load_spec, parse_walltime

__all__ = ["JobSpec", "SpecError", "load_spec", "load_site", "parse_walltime"]
