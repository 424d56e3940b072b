"""The run folder's logs: config.json, metrics.jsonl, summary.json, TensorBoard events. Rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import dist
from .atomic import write_text_atomic
from .run import RunPaths

__all__ = ["RunLog"]


def _clean(v: Any) -> Any:
    # JSON has no NaN: write null so every reader can parse the file.
    return None if isinstance(v, float) and not math.isfinite(v) else v


class RunLog:
    """Writes the run folder on rank 0; on other ranks every method does nothing."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = dist.is_main()
        self._tb = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if self.enabled:
            write_text_atomic(self.run_dir / name, json.dumps({k: _clean(v) for k, v in data.items()}, indent=1))

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl and the numeric fields to TensorBoard as `split/name`."""
        if not self.enabled:
            return
        with open(RunPaths(self.run_dir).metrics, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch",) and math.isfinite(v):
                    self._tb.add_scalar(f"{record.get('split', 'run')}/{k}", v, record.get("epoch", 0))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
