"""The Optuna side of a tuning worker: storage, sampler, pruner, worker identity, heartbeats and retries.

Storage strings (`--storage`):

    (none)                         sqlite:///STUDY_DIR/study.db  one node, a few workers
    sqlite:///path.db, postgresql://user@host/db, mysql+pymysql://...   any SQLAlchemy URL (RDB storage)
    journal:PATH                   JournalFileBackend log file (shared file systems, no database server)
    PATH.db | PATH.sqlite          an SQLite file;  any other bare PATH: a journal file (as slurm/tune_array.sh)

RDB storages get a heartbeat: a worker killed mid-trial (SIGKILL, node failure) leaves its trial RUNNING; once the
heartbeat is older than the grace period the next worker marks it FAIL and `RetryHeartbeatStaleTrialCallback`
(formerly `RetryFailedTrialCallback`) queues the same parameters again. Journal storages have no heartbeat, so
each worker also holds a lock on `STUDY_DIR/workers/<id>.lock`: a worker that restarts with its id (same Slurm
array task, or the first free id on this host) fails and re-queues the trials it left RUNNING itself.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from .errors import TuningError

__all__ = [
    "SAMPLERS",
    "PRUNERS",
    "StudyError",
    "StorageSpec",
    "Worker",
    "worker_seed",
    "make_sampler",
    "make_pruner",
    "parse_storage",
    "open_storage",
    "open_study",
    "count_trials",
    "claim_worker",
    "reclaim_orphans",
    "fail_stale",
    "heartbeat",
    "retry_callback",
]

SAMPLERS = ("tpe", "gp")
PRUNERS = ("median", "sha", "hyperband", "none")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


class StudyError(TuningError):
    """A storage, study or worker set-up that cannot be used; the message says which and why."""


def worker_seed(base_seed: int, worker_id: int, generation: int = 0) -> int:
    """A sampler seed that differs per worker and per restart of a worker, reproducibly.

    Every worker with one seed would propose the same start-up trials (optuna#4714); a restarted worker with its
    old seed would propose its first trials again. `generation` is the number of trials in the study when the
    worker started, so a restart draws new ones.
    """
    return int(np.random.SeedSequence([base_seed, worker_id, generation]).generate_state(1)[0])


def make_sampler(kind: str, seed: int, n_startup_trials: int = 10) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, constant liar: running trials count as bad so parallel workers spread out) or GP.

    GP suits small, mostly continuous spaces; it has no constant liar, so parallel GP workers rely on their seeds.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # multivariate/constant_liar are marked experimental
        if kind == "tpe":
            return optuna.samplers.TPESampler(
                n_startup_trials=n_startup_trials, multivariate=True, constant_liar=True, seed=seed
            )
        if kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    raise StudyError(f"unknown sampler {kind!r}; expected one of {', '.join(SAMPLERS)}")


def make_pruner(
    kind: str, max_epochs: int, n_startup_trials: int = 5, n_warmup_steps: int = 0
) -> optuna.pruners.BasePruner:
    """Pruner over epochs (the step of each report): median, successive halving, Hyperband or none."""
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    if kind == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_epochs), reduction_factor=3)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise StudyError(f"unknown pruner {kind!r}; expected one of {', '.join(PRUNERS)}")


@dataclass(frozen=True)
class StorageSpec:
    """Where the study lives: an RDB URL or a journal file."""

    kind: str  # "rdb" | "journal"
    url: str  # the SQLAlchemy URL, or the journal file path

    @property
    def is_sqlite(self) -> bool:
        return self.kind == "rdb" and self.url.startswith("sqlite")

    def describe(self) -> str:
        if self.kind == "journal":
            return f"journal file {self.url} (no heartbeat: restarted workers re-queue their own trials)"
        return f"RDB {_hide_password(self.url)}"


def _hide_password(url: str) -> str:
    head, sep, tail = url.partition("://")
    if sep and "@" in tail and ":" in tail.split("@", 1)[0]:
        user = tail.split("@", 1)[0].split(":", 1)[0]
        return f"{head}://{user}:***@{tail.split('@', 1)[1]}"
    return url


def parse_storage(text: str | None, study_dir: str | Path) -> StorageSpec:
    """Read a `--storage` string (see the module docstring); relative paths are taken from the working folder."""
    if not text:
        return StorageSpec("rdb", f"sqlite:///{(Path(study_dir) / 'study.db').resolve()}")
    if text.startswith("journal:"):
        path = text[len("journal:") :]
        if not path:
            raise StudyError("--storage journal: needs a file path, e.g. journal:runs/tune/study.journal")
        return StorageSpec("journal", str(Path(path).resolve()))
    if "://" in text:
        return StorageSpec("rdb", text)
    if text.endswith(_SQLITE_SUFFIXES):
        return StorageSpec("rdb", f"sqlite:///{Path(text).resolve()}")
    return StorageSpec("journal", str(Path(text).resolve()))


def retry_callback(max_retry: int) -> RetryHeartbeatStaleTrialCallback:
    """Re-queue a failed trial's parameters (up to `max_retry` times), keeping its reported epochs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)


def open_storage(
    spec: StorageSpec, heartbeat_interval: int = 60, grace_period: int | None = None, max_retry: int = 3
) -> optuna.storages.BaseStorage:
    """The storage object (rank 0 only); creates the folder of an SQLite or journal file.

    Args:
        heartbeat_interval: seconds between a running trial's heartbeats (RDB only; 0 turns heartbeats off).
        grace_period: seconds without a heartbeat before a RUNNING trial counts as dead (default 2 x interval).
        max_retry: how often the parameters of a dead trial are queued again.
    """
    if spec.kind == "journal":
        Path(spec.url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(spec.url))
    engine_kwargs: dict[str, Any] = {}
    if spec.is_sqlite:
        path = spec.url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Several workers on one SQLite file take turns at its lock: wait for it rather than fail at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval is marked experimental
        return RDBStorage(
            spec.url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval or None,
            grace_period=(grace_period or 2 * heartbeat_interval) if heartbeat_interval else None,
            heartbeat_stale_trial_callback=retry_callback(max_retry) if heartbeat_interval else None,
        )


def open_study(
    name: str,
    storage: optuna.storages.BaseStorage,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    direction: str,
    attrs: dict[str, Any],
) -> optuna.Study:
    """Create the study or continue it (load_if_exists); check that it was made for the same task and metric.

    `attrs` (task, monitor, base config, space, ...) are stored on a new study; an existing study must agree on
    `task`, `monitor` and `direction`.
    """
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, pruner=pruner, direction=direction, load_if_exists=True
    )
    if study.direction.name.lower() != direction:
        raise StudyError(
            f"study {name!r} exists with direction {study.direction.name.lower()}, this run asks {direction}"
        )
    saved = study.user_attrs
    for key in ("task", "monitor"):
        if key in saved and saved[key] != attrs.get(key):
            raise StudyError(f"study {name!r} was made with {key} {saved[key]!r}; this run asks {attrs.get(key)!r}")
    for key, value in attrs.items():
        if key not in saved:
            study.set_user_attr(key, value)
    return study


def count_trials(storage: optuna.storages.BaseStorage, name: str) -> int:
    """Trials in study `name` (0 when it does not exist yet)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


@dataclass
class Worker:
    """This worker's identity: `id` (unique among live workers of a study folder), `key` (stable across restarts)."""

    id: int
    key: str
    lock: IO | None = None
    seed: int = 0  # the sampler seed, set once the study's size is known (`worker_seed`)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file drops the flock
            self.lock = None


def _try_lock(path: Path) -> IO | None:
    f = open(path, "a+")  # held open for the worker's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{socket.gethostname()} pid {os.getpid()}\n")
    f.flush()
    return f


def claim_worker(study_dir: str | Path, worker_id: int | None = None) -> Worker:
    """Take a worker id: `worker_id` if given (error when a live worker holds it), else the first free one from
    SLURM_ARRAY_TASK_ID (or 0). The lock is an flock on STUDY_DIR/workers/<id>.lock, dropped when the process dies.
    """
    lock_dir = Path(study_dir) / "workers"
    lock_dir.mkdir(parents=True, exist_ok=True)
    array_task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    start = worker_id if worker_id is not None else int(array_task) if array_task.isdigit() else 0
    # Stable across restarts of the same worker: the array job (any node) or this host.
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID", "")
    place = f"array{array_job}" if array_job and array_task else socket.gethostname()
    for wid in range(start, start + 1000):
        path = lock_dir / f"{wid}.lock"
        try:
            f = _try_lock(path)
        except OSError as e:  # a file system without flock (e.g. Lustre mounted without -o flock)
            warnings.warn(f"cannot lock {path} ({e}); worker id {wid} is not guaranteed unique", stacklevel=2)
            return Worker(wid, f"{place}:{wid}")
        if f is not None:
            return Worker(wid, f"{place}:{wid}", f)
        if worker_id is not None:
            raise StudyError(f"worker id {worker_id} is held by a running worker ({path}); pass another --worker-id")
    raise StudyError(f"no free worker id from {start} in {lock_dir}")


def _fail_and_retry(study: optuna.Study, trial_id: int, max_retry: int) -> bool:
    """Mark one RUNNING trial FAIL and queue its parameters again; False when another process got there first."""
    storage = study._storage  # Optuna's own fail_stale_trials works on the storage the same way
    try:
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    retry_callback(max_retry)(study, copy.deepcopy(storage.get_trial(trial_id)))
    return True


def reclaim_orphans(study: optuna.Study, worker: Worker, max_retry: int = 3) -> list[int]:
    """Trials this worker left RUNNING when it was killed: mark them FAIL and queue them again.

    Safe because the worker key is held by one live process at a time (the lock of `claim_worker`).
    """
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") == worker.key and _fail_and_retry(study, t._trial_id, max_retry):
            numbers.append(t.number)
    return numbers


def fail_stale(study: optuna.Study) -> None:
    """Fail (and re-queue) RUNNING trials whose heartbeat stopped: a no-op without heartbeats (journal storage)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextlib.contextmanager
def heartbeat(study: optuna.Study | None, trial: optuna.Trial | FrozenTrial | None) -> Iterator[None]:
    """Record the trial's heartbeat every interval while the block runs (RDB storages with a heartbeat only)."""
    storage = study._storage if study is not None else None
    interval = (
        storage.get_heartbeat_interval() if storage is not None and hasattr(storage, "record_heartbeat") else None
    )
    if not interval or trial is None:
        yield
        return
    stop = threading.Event()
    trial_id = trial._trial_id  # Optuna exposes no public trial id

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
