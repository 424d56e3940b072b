"""The job spec that every scheduler script is rendered from, with its checks.

A spec says what a job needs (GPUs, CPUs, memory, time), where it runs (partition or queue, account, site set-up
lines) and what it runs (the command, the launcher). Nodes follow from the GPU count: ``ceil(gpus / gpus_per_node)``.
Bad specs raise `SpecError` naming the spec and the field, before any script is written.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["JobSpec", "SpecError", "SCHEDULERS", "LAUNCHERS", "load_spec", "load_site", "parse_walltime"]

SCHEDULERS = ("slurm", "pbs")
# "none" runs the command as one plain process (a report job, a single-GPU worker needs no MPI launcher).
LAUNCHERS = ("srun", "mpirun", "horovodrun", "none")
_DEFAULT_LAUNCHER = {"slurm": "srun", "pbs": "mpirun"}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_MEM = re.compile(r"^[1-9][0-9]*[KMGT]$")
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$")
_ARRAY = re.compile(r"^\d+(-\d+)?(:\d+)?(,\d+(-\d+)?)*(%\d+)?$")
_SLURM_MAX_SIGNAL_S = 65535  # sbatch --signal takes at most 0xffff seconds


class SpecError(ValueError):
    """A job spec that cannot make a working script; the message names the spec and the field."""


def parse_walltime(text: str) -> int:
    """Seconds in a walltime written ``HH:MM:SS`` or ``D-HH:MM:SS``.

    Raises:
        ValueError: when the text has another form or minutes/seconds of 60 or more.
    """
    m = _WALLTIME.match(text)
    if not m or int(m.group(3)) >= 60 or int(m.group(4)) >= 60:
        raise ValueError(f"walltime must look like HH:MM:SS or D-HH:MM:SS, got {text!r}")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(frozen=True)
class JobSpec:
    """One job script. Fields left at their defaults give a 1-GPU Slurm job launched with srun."""

    name: str  # job name; also the run folder prefix (runs/<name>_<job id>) and the script's file name
    command: str  # what every rank runs, e.g. 'python -m jobs.demo --run-dir "$RUN_DIR" --resume'
    description: str = ""  # one line for the script's header
    scheduler: str = "slurm"  # slurm (sbatch) or pbs (qsub, PBS Pro / OpenPBS; Torque noted in the script)
    launcher: str = ""  # srun | mpirun | horovodrun | none; empty: srun under Slurm, mpirun under PBS
    gpus: int = 1  # GPUs in all = ranks (one rank per GPU); 0 for a CPU job of `tasks` ranks
    gpus_per_node: int = 4  # GPUs on one node of the partition; jobs above this take whole nodes
    tasks: int = 0  # CPU job only (gpus = 0): ranks, all on one node
    cpus_per_task: int = 8  # CPUs per rank: data-loading workers and intra-op threads (OMP_NUM_THREADS)
    mem: str = ""  # memory per node, e.g. "256G"; empty: the partition's default
    walltime: str = "24:00:00"  # HH:MM:SS or D-HH:MM:SS
    partition: str = ""  # Slurm partition or PBS queue; empty: the scheduler's default
    account: str = ""  # account charged (sbatch --account, qsub -A); empty: the user's default
    setup: tuple[str, ...] = ()  # site set-up lines: module loads, conda/venv activation
    prelude: tuple[str, ...] = ()  # job lines run before the launch (e.g. variables the command uses)
    run_dir: bool = True  # the job owns a run folder runs/<name>_<job id> (exported as RUN_DIR)
    run_root: str = "runs"  # where run folders go, relative to the repository root
    signal_seconds: int = 300  # warning signal (USR1) this long before the time limit; 0: none
    requeue: bool = True  # the job may be requeued (node failure; REQUEUE file after a preemption checkpoint)
    array: str = ""  # Slurm array range, e.g. "0-7" or "0-31%8": one task per index
    log: str = ""  # log file pattern; empty: %x_%j.out (%x_%A_%a.out for arrays) in the submission folder
    script: str = ""  # the script's path in the repository (PBS resubmits itself by it); empty: slurm[/pbs]/<name>.sh

    def __post_init__(self) -> None:
        if not self.launcher:
            object.__setattr__(self, "launcher", _DEFAULT_LAUNCHER.get(self.scheduler, "srun"))
        if not self.script:
            folder = "slurm/pbs" if self.scheduler == "pbs" else "slurm"
            object.__setattr__(self, "script", f"{folder}/{self.name}.sh")
        object.__setattr__(self, "setup", tuple(self.setup))
        object.__setattr__(self, "prelude", tuple(self.prelude))
        self.validate()

    # ---- derived ---------------------------------------------------------------------------------------------
    @property
    def ranks(self) -> int:
        """Processes in the job: one per GPU, or `tasks` for a CPU job."""
        return self.gpus if self.gpus > 0 else self.tasks

    @property
    def nodes(self) -> int:
        """Nodes to ask for: ceil(gpus / gpus_per_node), one for a CPU job."""
        return math.ceil(self.gpus / self.gpus_per_node) if self.gpus > 0 else 1

    @property
    def ranks_per_node(self) -> int:
        return self.ranks // self.nodes

    @property
    def walltime_seconds(self) -> int:
        return parse_walltime(self.walltime)

    def replace(self, **changes: Any) -> JobSpec:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    # ---- checks ----------------------------------------------------------------------------------------------
    def _fail(self, problem: str) -> SpecError:
        return SpecError(f"job spec {self.name!r}: {problem}")

    def validate(self) -> None:
        """Raise `SpecError` for a spec that would render a script that cannot run as intended."""
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise SpecError(
                f"job spec name {self.name!r}: use letters, digits, '_', '-' or '.', starting with a letter "
                "(it becomes the job name, the run folder and the file name)"
            )
        if not self.command.strip():
            raise self._fail("command is empty")
        if self.scheduler not in SCHEDULERS:
            raise self._fail(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.launcher not in LAUNCHERS:
            raise self._fail(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.scheduler == "pbs" and self.launcher == "srun":
            raise self._fail("srun is Slurm's launcher; a PBS job uses mpirun, horovodrun or none")
        for key in ("gpus", "gpus_per_node", "tasks", "cpus_per_task", "signal_seconds"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise self._fail(f"{key} must be a whole number >= 0, got {value!r}")
        self._validate_ranks()
        if self.cpus_per_task < 1:
            raise self._fail("cpus_per_task must be at least 1")
        if self.mem and not _MEM.match(self.mem):
            raise self._fail(f"mem must be a number with a unit K, M, G or T (per node), e.g. '256G'; got {self.mem!r}")
        try:
            wall = parse_walltime(self.walltime)
        except ValueError as e:
            raise self._fail(str(e)) from None
        if wall == 0:
            raise self._fail("walltime is zero")
        if self.signal_seconds >= wall:
            raise self._fail(
                f"signal_seconds ({self.signal_seconds}) must be shorter than the walltime {self.walltime} "
                f"({wall} s): the warning would come before the job starts"
            )
        if self.signal_seconds > _SLURM_MAX_SIGNAL_S:
            raise self._fail(f"signal_seconds is at most {_SLURM_MAX_SIGNAL_S} (Slurm's limit)")
        if self.array:
            if self.scheduler != "slurm":
                raise self._fail("array jobs are rendered for Slurm only (PBS Pro writes them -J 0-7)")
            if not _ARRAY.match(self.array):
                raise self._fail(f"array must be a Slurm range such as '0-7' or '0-31%8', got {self.array!r}")
        if self.signal_seconds and not self.run_dir:
            raise self._fail("a warning signal needs a run folder: the trainer checkpoints and writes REQUEUE there")
        for key in ("partition", "account"):
            value = getattr(self, key)
            if value and not re.match(r"^[A-Za-z0-9_.,@-]+$", value):
                raise self._fail(f"{key} {value!r} has characters a scheduler directive does not take")

    def _validate_ranks(self) -> None:
        if self.gpus > 0:
            if self.tasks:
                raise self._fail(f"tasks ({self.tasks}) is for CPU jobs; a GPU job runs one rank per GPU (gpus)")
            if self.gpus_per_node < 1:
                raise self._fail(f"gpus_per_node must be at least 1 for a job of {self.gpus} GPUs")
            if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
                raise self._fail(
                    f"{self.gpus} GPUs do not fill whole nodes of {self.gpus_per_node} GPUs: use at most "
                    f"{self.gpus_per_node} (one node) or a multiple of {self.gpus_per_node}"
                )
        elif self.tasks < 1:
            raise self._fail("a job needs gpus >= 1, or gpus = 0 and tasks >= 1 (a CPU job)")
        if self.launcher == "none" and self.ranks != 1:
            raise self._fail(f"launcher 'none' runs one process, but the job has {self.ranks} ranks")


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"job spec file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def _spec_from_dict(data: dict[str, Any], where: str) -> JobSpec:
    known = {f.name for f in dataclasses.fields(JobSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("name", "command"):
        if key not in data:
            raise SpecError(f"{where}: the field {key!r} is required")
    try:
        return JobSpec(**data)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None


def load_spec(path: str | Path, **overrides: Any) -> JobSpec:
    """A `JobSpec` from a YAML file of ``field: value`` lines, with `overrides` (non-empty ones) on top."""
    path = Path(path)
    data = _load_yaml(path)
    data.update({k: v for k, v in overrides.items() if v not in (None, "")})
    return _spec_from_dict(data, str(path))


@dataclass(frozen=True)
class Site:
    """Settings shared by every checked-in script (slurm/specs/site.yaml)."""

    partition: str = ""  # Slurm partition of the GPU nodes
    queue: str = ""  # PBS queue of the GPU nodes
    account: str = ""  # account charged; empty: the user's default
    gpus_per_node: int = 4  # GPUs per node of that partition/queue
    signal_seconds: int = 300  # warning before the time limit, for the checkpoint and requeue
    setup: tuple[str, ...] = field(default_factory=tuple)  # module loads, conda/venv activation


def load_site(path: str | Path) -> Site:
    """The site settings from `path`; unknown keys are an error (a typo would otherwise be ignored)."""
    path = Path(path)
    data = _load_yaml(path)
    known = {f.name for f in dataclasses.fields(Site)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    data = {k: ("" if v is None else v) for k, v in data.items()}
    if "setup" in data:
        if not isinstance(data["setup"], list) or not all(isinstance(s, str) for s in data["setup"]):
            raise SpecError(f"{path}: setup must be a list of shell lines")
        data["setup"] = tuple(data["setup"])
    return Site(**data)
