"""hvdtrain: the distributed-training core shared by every trainer (Horovod behind one seam)."""

from . import batching, checkpoint, data, dist, metrics, optim, schedule, seeding, syncbn
from .config import TrainConfig, arg, parse_config, to_dict
from .loop import evaluate, fit, train_one_epoch

__all__ = [
    "batching",
    "checkpoint",
    "data",
    "dist",
    "metrics",
    "optim",
    "schedule",
    "seeding",
    "syncbn",
    "TrainConfig",
    "arg",
    "parse_config",
    "to_dict",
    "evaluate",
    "fit",
    "train_one_epoch",
]
