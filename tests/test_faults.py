"""Fault injection with real processes: a killed rank, a stopped (hung) rank, bad data on one rank's shard, a full disk.

Each test asserts the exit code, a time bound and the message a user would read.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hvdtrain.watchdog import STALL_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-bind-to", "none"]
MPIRUN += ["-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
DEMO = [sys.executable, "-m", "jobs.demo", "--epochs", "200", "--no-progress", "--threads", "1"]


def _launcher(kind: str) -> list[str]:
    return MPIRUN if kind == "mpirun" else ["horovodrun", "-np", "2", "--gloo"]


def _rank_pid(tag: str, rank: int, timeout: float = 90) -> int:
    """The pid of `rank` among the processes whose command line holds `tag` (the launcher sets its rank variable)."""
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True).stdout.split()
        for pid in map(int, out):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env or f"HOROVOD_RANK={rank}".encode() in env:
                return pid
        time.sleep(0.5)
    raise AssertionError(f"rank {rank} of {tag} never started")


def _start_training(run_dir: Path, kind: str, *extra: str) -> subprocess.Popen:
    cmd = [*_launcher(kind), *DEMO, "--run-dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the first epoch is logged: the ranks are inside the training loop."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file():
            return
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"training never started:\n{proc.communicate()[0][-3000:]}")


pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("kind", ["mpirun", "horovodrun"])
def test_killed_rank_ends_the_job(tmp_path, kind):
    run = tmp_path / f"kill_{kind}"
    proc = _start_training(run, kind)
    try:
        _wait_training(run, proc)
        os.kill(_rank_pid(str(run), 1), signal.SIGKILL)
        t0 = time.time()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0, out[-2000:]
    assert time.time() - t0 < 30
    assert "exited on signal 9" in out or "Killed" in out or "SIGKILL" in out or "signal 9" in out, out[-2000:]


def test_stopped_rank_under_mpirun_ends_within_the_stall_timeout(tmp_path):
    run, timeout = tmp_path / "stop", 6
    proc = _start_training(run, "mpirun", "--stall-timeout", str(timeout))
    stopped = None
    try:
        _wait_training(run, proc)
        stopped = _rank_pid(str(run), 1)
        os.kill(stopped, signal.SIGSTOP)  # a hung rank: alive, silent, holding the others in the next allreduce
        t0 = time.time()
        out, _ = proc.communicate(timeout=timeout + 60)
        took = time.time() - t0
    finally:
        proc.kill()
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
    (run / "out.txt").write_text(out)
    assert proc.returncode == STALL_EXIT_CODE, f"rc {proc.returncode}, {took:.0f} s: {out[:3000]}"
    assert took < timeout + 60
    assert "hvdtrain watchdog: rank 0 made no progress" in out and "it waited at " in out, out[:3000]
    assert "Ranks that did not arrive: rank 1 (" in out and f"pid {stopped}): silent for" in out, out[:3000]
    assert "rank 1 (" in out and f"pid {stopped}) : silent".replace(" :", ":") in out, out[-3000:]
    assert "hvdtrain/loop.py" in out  # the stack of the blocked main thread
    assert (run / "STALLED").is_file()


def _nii(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 1.0, 1.0])), str(path))


@pytest.mark.parametrize("fault", ["nan", "truncated"])
def test_bad_volume_on_rank_1s_preprocessing_shard(tmp_path, fault):
    """Case 1 (preprocessed by rank 1) holds a NaN or is a truncated file: the job stops naming it, nothing trains."""
    rng = np.random.default_rng(0)
    for i in range(4):
        vol = rng.normal(-600, 200, (20, 20, 12)).astype(np.float32)
        lab = np.zeros((20, 20, 12), np.uint8)
        lab[8:12, 8:12, 4:8] = 1
        if i == 1 and fault == "nan":
            vol[3, 4, 5] = np.nan
        _nii(tmp_path / "data" / "images" / f"c{i}.nii.gz", vol)
        _nii(tmp_path / "data" / "labels" / f"c{i}.nii.gz", lab)
    bad = tmp_path / "data" / "images" / "c1.nii.gz"
    if fault == "truncated":  # a copy cut short (a full disk, an interrupted transfer)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    cmd = [*MPIRUN, sys.executable, "-m", "jobs.train_unet", "--data", str(tmp_path / "data"), "--run-dir",
           str(tmp_path / "run"), "--features", "4", "--depth", "2", "--patch-size", "16", "16", "8", "--epochs", "1",
           "--target-spacing", "0", "0", "0", "--val-fraction", "0.5", "--no-progress"]  # fmt: skip
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and time.time() - t0 < 120
    if fault == "nan":
        assert "NonFiniteError" in out and "c1.nii.gz has 1 non-finite voxel" in out and "(3, 4, 5)" in out, out[-3000:]
    else:
        assert "NiftiReadError: cannot read NIfTI file" in out and str(bad) in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_disk_full_during_preprocessing_leaves_no_trusted_entry(tmp_path):
    _nii(tmp_path / "images" / "big.nii.gz", np.random.default_rng(0).normal(0, 1, (64, 64, 40)).astype(np.float32))
    script = (
        "import sys; from segmentation.io import list_cases; from segmentation.preprocess import *\n"
        "preprocess_dataset(list_cases(sys.argv[1], 'test'), sys.argv[2], PreprocessParams(target_spacing=(0, 0, 0)))"
    )
    cmd = [sys.executable, "-c", script, str(tmp_path), str(tmp_path / "cache")]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # 64*64*40*4 bytes won't fit
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60, preexec_fn=limit)
    assert p.returncode != 0 and time.time() - t0 < 60
    assert "OSError" in p.stderr and "preprocess_dataset" in p.stderr, p.stderr[-2000:]  # EFBIG or a short write
    left = sorted(f.name for f in (tmp_path / "cache").rglob("*") if f.is_file())
    assert left == ["params.json"], left  # no array, no meta (what marks an entry complete), no temporary
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)  # the next start redoes it
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list((tmp_path / "cache").rglob("big.*.json"))) == 1
