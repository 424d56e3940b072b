"""Atomic file writes: a crash or a full disk leaves the old file whole (or no file), never half of a new one.

Each write goes to a unique temporary beside the target (so two writers never share one, and the rename stays on
one file system) and is moved into place with `os.replace`; the temporary is removed when the write fails.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["write_atomic", "write_text_atomic", "save_npy_atomic"]


def write_atomic(path: str | Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call `write(tmp)` on a temporary beside `path`, then rename it to `path`.

    `suffix` ends the temporary's name, for writers that pick the format from it (SimpleITK).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)  # atomic on POSIX
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_npy_atomic(path: str | Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, array)

    return write_atomic(path, write)
