"""hvdtrain: the distributed-training core shared by every trainer (Horovod behind one seam)."""

from . import batching, checkpoint, data, dist, metrics, schedule, seeding, syncbn
from .config import TrainConfig, arg, parse_config, to_dict
from .loop import evaluate, evaluate_best, fit, train_one_epoch
from .run import Run, RunPaths, SplitStep

__all__ = [
    "batching",
    "checkpoint",
    "data",
    "dist",
    "metrics",
    "schedule",
    "seeding",
    "syncbn",
    "TrainConfig",
    "arg",
    "parse_config",
    "to_dict",
    "evaluate",
    "evaluate_best",
    "fit",
    "Run",
    "RunPaths",
    "SplitStep",
    "train_one_epoch",
]
