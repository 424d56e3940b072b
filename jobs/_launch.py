"""The environment for jobs that launch other jobs (benchmarks): this Python's tools first, one thread per rank."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def child_env(**extra: str) -> dict[str, str]:
    """os.environ with this interpreter's bin folder first on PATH and OMP_NUM_THREADS=1, plus `extra`.

    `.venv/bin/python -m jobs.bench_unet` without an activated venv would otherwise find no `horovodrun`
    (or another environment's), and each rank would take every core.
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(filter(None, [bin_dir, os.environ.get("PATH")]))
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **extra}
