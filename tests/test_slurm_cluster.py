"""The rendered job script on a real one-node Slurm cluster: a 2-rank Horovod run, then a preempted one.

The cluster is started by scripts/slurm_cluster.sh (munged, slurmctld, slurmd as root, in a folder); the tests submit
slurm/demo_2cpu.sh, the CPU variant that `python -m slurm --all` writes, unchanged. They skip only without root
or without the Debian packages (slurm-wlm, munge); anything else that goes wrong fails them, with the job's log.
A session starts its own private cluster, or uses the one in $HVDTRAIN_SLURM_DIR (see the `cluster` fixture).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
SCRIPT = "slurm/demo_2cpu.sh"
EPOCHS = 3  # the --epochs in the script's command (checked below)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the Slurm cluster tests run as root (they start munged, slurmctld and slurmd)"
    missing = [p for p in ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd") if not Path(p).exists()]
    missing += [c for c in ("sbatch", "scontrol", "scancel") if shutil.which(c) is None]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)}): apt-get install slurm-wlm munge"
    return None


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on localhost (slurmctld and slurmd of a private cluster)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on localhost")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A running one-node cluster; the environment (SLURM_CONF) for talking to it.

    With $HVDTRAIN_SLURM_DIR set (e.g. by CI, after `scripts/slurm_cluster.sh start DIR`) that cluster is used and
    left running. Otherwise the session starts a private one on free ports in a temporary folder and stops it at
    the end, so that test sessions running side by side do not share (or stop) each other's cluster.
    """
    reason = _skip_reason()
    if reason and os.geteuid() != 0:
        pytest.skip(reason)  # starting munged/slurmctld needs root; CI runs as root
    if reason:
        pytest.fail(reason)  # `make setup` installs them as root: missing here means the set-up is broken
    folder = os.environ.get("HVDTRAIN_SLURM_DIR")
    own = not folder
    env_start = dict(os.environ)
    if own:
        folder = str(tmp_path_factory.mktemp("slurm_cluster"))
        env_start["SLURM_CLUSTER_PORT"] = str(_free_port_pair())
    cmd = ["bash", str(CLUSTER_SCRIPT)]
    p = subprocess.run([*cmd, "start", folder], capture_output=True, text=True, timeout=180, env=env_start)
    if p.returncode != 0:
        if own:
            subprocess.run([*cmd, "stop", folder], capture_output=True, timeout=180, env=env_start)
        pytest.fail(f"scripts/slurm_cluster.sh start {folder} failed:\n{p.stdout}\n{p.stderr}")
    # Nothing from an enclosing job or launcher (a CI runner inside Slurm, mpirun) may leak into the test jobs.
    env = {k: v for k, v in os.environ.items() if not re.match(r"(SLURM_|PMIX?_|OMPI_|HOROVOD_)", k)}
    env["SLURM_CONF"] = f"{folder}/etc/slurm.conf"
    env["SLURM_CLUSTER_DIR"] = folder
    yield env
    if own:
        subprocess.run([*cmd, "stop", folder], capture_output=True, timeout=180, env=env_start)


def _run(env: dict[str, str], *args: str) -> str:
    p = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {p.stdout}{p.stderr}")
    return p.stdout


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (there is no accounting database for sacct here)."""
    return dict(re.findall(r"(\w+)=(\S*)", _run(env, "scontrol", "show", "job", "-o", job)))


def submit(
    env: dict[str, str],
    log_dir: Path,
    *args: str,
    run_dir: Path | None = None,
    hold: bool = False,
    script: str = SCRIPT,
) -> str:
    """sbatch `script` from the repository root; its log goes to `log_dir`. Returns the job id."""
    export = "ALL" + (f",RUN_DIR={run_dir}" if run_dir else "")
    flags = ["--parsable", f"--output={log_dir}/%x_%j.out", f"--export={export}"] + (["--hold"] if hold else [])
    return _run(env, "sbatch", *flags, script, *args).strip().split(";")[0]


def diagnostics(env: dict[str, str], job: str, log_dir: Path) -> str:
    """The job's log and the daemons' last lines, for a failure message."""
    parts = []
    for f in sorted(log_dir.glob(f"*_{job}.out")):
        text = f.read_text(errors="replace").replace("\r", "\n")
        lines = [ln for ln in text.splitlines() if ln.strip() and "it/s]" not in ln]  # drop progress bars
        parts.append(f"--- {f.name}\n" + "\n".join(lines[-60:]))
    for name in ("slurmctld.log", "slurmd.log"):
        f = Path(env["SLURM_CLUSTER_DIR"]) / "log" / name
        if f.exists():
            parts.append(f"--- {name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
    try:
        parts.append("--- scontrol show job\n" + _run(env, "scontrol", "show", "job", job))
    except RuntimeError as e:
        parts.append(str(e))
    return "\n".join(parts)


def wait_until(env: dict[str, str], job: str, log_dir: Path, done, timeout: float, what: str) -> dict[str, str]:
    """Poll the job until `done(info)`; fail with the diagnostics after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        info = job_info(env, job)
        if done(info):
            return info
        if time.time() > deadline:
            pytest.fail(f"job {job}: {what} not seen within {timeout:.0f} s\n{diagnostics(env, job, log_dir)}")
        time.sleep(1)


@pytest.fixture
def jobs(cluster: dict[str, str]):
    """Job ids submitted by a test; cancelled afterwards whatever happened."""
    ids: list[str] = []
    yield ids
    for job in ids:
        subprocess.run(["scancel", job], env=cluster, capture_output=True, timeout=60)


def check_run_folder(run_dir: Path) -> None:
    """The run folder of a finished demo run: every epoch's records exactly once, checkpoint at the last epoch."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["epoch"], r["split"]) for r in records]
    assert sorted(keys) == [(e, s) for e in range(EPOCHS) for s in ("train", "val")], keys
    assert {r["world_size"] for r in records} == {2}
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == EPOCHS
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == EPOCHS and summary["world_size"] == 2
    assert not (run_dir / "REQUEUE").exists()


def test_script_is_the_rendered_cpu_variant() -> None:
    from slurm.catalog import catalog

    assert (ROOT / SCRIPT).read_text() == catalog()[SCRIPT]
    assert f"--epochs {EPOCHS} --resume" in (ROOT / SCRIPT).read_text()


def test_two_rank_job_completes(cluster: dict[str, str], jobs: list[str], tmp_path: Path) -> None:
    """sbatch slurm/demo_2cpu.sh: 2 tasks, srun --mpi=pmix, Horovod over MPI, run folder keyed by the job id."""
    job = submit(cluster, tmp_path, hold=True)
    jobs.append(job)
    run_dir = ROOT / "runs" / f"demo_2cpu_{job}"
    shutil.rmtree(run_dir, ignore_errors=True)  # left by a job of the same id on an earlier cluster
    _run(cluster, "scontrol", "release", job)
    info = wait_until(cluster, job, tmp_path, lambda i: i["JobState"] in ENDED, 150, "the end")
    try:
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), diagnostics(cluster, job, tmp_path)
        assert info["NumTasks"] == "2"
        check_run_folder(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_preempted_job_checkpoints_requeues_and_resumes(
    cluster: dict[str, str], jobs: list[str], tmp_path: Path
) -> None:
    """USR1 during training: checkpoint + REQUEUE, `scontrol requeue` by the script, resume, the same epochs."""
    run_dir = tmp_path / "run"
    # More samples per epoch than the first test: the signal must land before training ends.
    job = submit(cluster, tmp_path, "--n-train", "8192", run_dir=run_dir)
    jobs.append(job)
    metrics = run_dir / "metrics.jsonl"
    # Signal as soon as epoch 0 is logged (the handlers are installed by then): the file is polled every 0.1 s,
    # so the signal lands early in epoch 1, seconds before the 3 epochs could end even on a fast machine.
    deadline = time.time() + 120
    for n in range(10**6):
        if metrics.exists() and metrics.stat().st_size > 0:
            break
        if n % 20 == 0 and job_info(cluster, job)["JobState"] in ENDED:
            pytest.fail(f"job {job} ended before it was signalled\n{diagnostics(cluster, job, tmp_path)}")
        if time.time() > deadline:
            pytest.fail(f"job {job}: no metrics after 120 s\n{diagnostics(cluster, job, tmp_path)}")
        time.sleep(0.1)
    # Without --batch the signal goes to the job steps, i.e. to every rank, as --signal=USR1@... does.
    _run(cluster, "scancel", "--signal=USR1", job)
    info = wait_until(cluster, job, tmp_path, lambda i: i["JobState"] in ENDED, 180, "the end")
    report = diagnostics(cluster, job, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), report
    assert info["Restarts"] == "1", report
    log = next(tmp_path.glob(f"*_{job}.out")).read_text(errors="replace")
    assert "REQUEUE written" in log and f"preempted: requeueing job {job}" in log, report
    assert "(restart 1)" in log and "resumed from" in log, report
    check_run_folder(run_dir)


def test_unet_cpu_variant_on_phantoms(cluster: dict[str, str], jobs: list[str], tmp_path: Path) -> None:
    """sbatch slurm/unet_2cpu.sh (the U-Net job on CPUs, 2 ranks) on phantom CT, 2 epochs."""
    data = tmp_path / "phantoms"
    subprocess.run(
        [sys.executable, "-m", "jobs.make_phantoms", str(data), "--preset", "demo", "--n-train", "8", "--n-val", "4"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    run_dir = tmp_path / "run"
    job = submit(cluster, tmp_path, "--data", str(data), "--epochs", "2", run_dir=run_dir, script="slurm/unet_2cpu.sh")
    jobs.append(job)
    info = wait_until(cluster, job, tmp_path, lambda i: i["JobState"] in ENDED, 300, "the end")
    report = diagnostics(cluster, job, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), report
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["epoch"] for r in records if r["split"] == "train") == [0, 1], report
    assert {r["world_size"] for r in records} == {2}
    assert "dice" in [r for r in records if r["split"] == "val"][-1], records
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2
