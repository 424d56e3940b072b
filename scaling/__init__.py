"""Scaling studies: a Horovod performance model (1..64 GPUs) and the report over real, simulated and predicted runs."""

from .perfmodel import PROFILES, MachineProfile, calibrate, get_profile, predict_table
from .report import make_report
from .runs import RunFolderError, load_run

__all__ = [
    "PROFILES",
    "MachineProfile",
    "RunFolderError",
    "calibrate",
    "get_profile",
    "load_run",
    "make_report",
    "predict_table",
]
