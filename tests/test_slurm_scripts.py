"""The rendered scripts' logic run with stand-in srun/mpirun/horovodrun/scontrol/qrerun/qsub (no scheduler needed).

Covers what the real-cluster tests cannot reach here: PBS, the mpirun/horovodrun launch paths, the signal
forwarding of each, and the requeue decisions (REQUEUE present or not, launcher failed, requeue refused).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A launcher stand-in. STUB_MODE: ok (exit 0), fail (exit 3), requeue (leave REQUEUE as a preempted trainer
# does, exit 0), wait (run until USR1, then act as a preempted trainer).
LAUNCHER = r"""#!/bin/bash
echo "$(basename "$0") $*" >>"$STUB_DIR/calls"
env >"$STUB_DIR/env_$(basename "$0")"
case "$STUB_MODE" in
ok) exit 0 ;;
fail) exit 3 ;;
requeue) echo preempted >"$RUN_DIR/REQUEUE"; exit 0 ;;
wait)
    trap 'touch "$STUB_DIR/got_usr1"; echo preempted >"$RUN_DIR/REQUEUE"; exit 0' USR1
    touch "$STUB_DIR/started"
    for _ in $(seq 300); do sleep 0.1; done
    exit 9 ;;
esac
"""
# horovodrun replaces itself with `sh -c "mpirun ..."`, as horovod/runner/mpi_run.py does.
HOROVODRUN = r"""#!/bin/bash
echo "horovodrun $*" >>"$STUB_DIR/calls"
exec /bin/sh -c 'mpirun "$@"' sh "$@"
"""
RECORDER = r"""#!/bin/bash
echo "$(basename "$0") $*" >>"$STUB_DIR/calls"
if [[ "$*" == "show hostnames"* ]]; then printf 'node1\nnode2\n'; fi
rc="STUB_RC_$(basename "$0")"
exit "${!rc:-${STUB_RC:-0}}"
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> dict:
    """A submission folder with jobs/, stand-in commands first on PATH, and an environment for the scripts."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in {
        "srun": LAUNCHER,
        "mpirun": LAUNCHER,
        "horovodrun": HOROVODRUN,
        "scontrol": RECORDER,
        "qrerun": RECORDER,
        "qsub": RECORDER,
    }.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True)
    (work / "slurm").symlink_to(ROOT / "slurm")  # the sweep submits slurm/<job>.sh from here
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("node1\nnode1\nnode1\nnode1\nnode2\nnode2\nnode2\nnode2\n")
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "STUB_DIR": str(tmp_path),
        "STUB_MODE": "ok",
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "8",
        "SLURM_CPUS_PER_TASK": "8",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "PBS_JOBID": "77.pbsserver",
        "PBS_O_WORKDIR": str(work),
        "PBS_NODEFILE": str(nodefile),
    }
    return {"env": env, "work": work, "stub": tmp_path}


def calls(box: dict) -> list[str]:
    f = box["stub"] / "calls"
    return f.read_text().splitlines() if f.exists() else []


def run_script(box: dict, rel: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / rel), *args],
        cwd=box["work"],
        env={**box["env"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---- Slurm -------------------------------------------------------------------------------------------------------
def test_slurm_srun_requeues_after_preemption(sandbox: dict) -> None:
    p = run_script(sandbox, "slurm/unet_8gpu.sh", "--epochs", "2", STUB_MODE="requeue")
    assert p.returncode == 0, p.stderr
    srun, requeue = calls(sandbox)
    assert srun.startswith(
        "srun --mpi=pmix --ntasks=8 --cpus-per-task=8 --kill-on-bad-exit=1 python -m jobs.train_unet"
    )
    assert srun.endswith("--run-dir runs/unet_8gpu_42 --resume --epochs 2")
    assert requeue == "scontrol requeue 42"
    run_dir = sandbox["work"] / "runs/unet_8gpu_42"
    assert run_dir.is_dir() and not (run_dir / "REQUEUE").exists()
    env = (sandbox["stub"] / "env_srun").read_text().splitlines()
    assert "OMP_NUM_THREADS=8" in env and "HOROVOD_FUSION_THRESHOLD=134217728" in env
    assert not any(line.startswith("CUDA_VISIBLE_DEVICES=") for line in env)


def test_slurm_no_requeue_when_finished_or_failed(sandbox: dict) -> None:
    p = run_script(sandbox, "slurm/unet_8gpu.sh")
    assert p.returncode == 0 and [c.split()[0] for c in calls(sandbox)] == ["srun"]
    # A failed launch is not requeued (it would fail again), even if a REQUEUE file is there.
    (sandbox["work"] / "runs/unet_8gpu_42/REQUEUE").write_text("stale")
    p = run_script(sandbox, "slurm/unet_8gpu.sh", STUB_MODE="fail")
    assert p.returncode == 3 and [c.split()[0] for c in calls(sandbox)] == ["srun", "srun"]


def test_slurm_requeue_refused(sandbox: dict) -> None:
    p = run_script(sandbox, "slurm/unet_8gpu.sh", STUB_MODE="requeue", STUB_RC="1")
    assert p.returncode == 1
    assert "sbatch --export=ALL,RUN_DIR=runs/unet_8gpu_42 slurm/unet_8gpu.sh" in p.stderr


def test_run_dir_override_and_repo_root_check(sandbox: dict, tmp_path: Path) -> None:
    p = run_script(sandbox, "slurm/unet_1gpu.sh", RUN_DIR="runs/earlier")
    assert p.returncode == 0 and "--run-dir runs/earlier --resume" in calls(sandbox)[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run(["bash", str(ROOT / "slurm/unet_1gpu.sh")], cwd=elsewhere, env=sandbox["env"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 1 and "submit from the repository root" in p.stderr


def test_slurm_mpirun_variant(sandbox: dict) -> None:
    p = run_script(sandbox, "tests/golden/slurm/unet_8gpu_mpirun.sh", STUB_MODE="requeue")
    assert p.returncode == 0, p.stderr
    mpirun, requeue = calls(sandbox)
    assert mpirun.startswith("mpirun -np 8 -bind-to none -map-by slot -mca pml ob1 -mca btl ^openib -x PATH")
    assert "-x OMP_NUM_THREADS -x NCCL_DEBUG" in mpirun and "-x LD_LIBRARY_PATH" not in mpirun  # unset: not named
    assert requeue == "scontrol requeue 42"


def test_slurm_horovodrun_host_list(sandbox: dict) -> None:
    p = run_script(sandbox, "tests/golden/slurm/unet_8gpu_horovodrun.sh")
    assert p.returncode == 0, p.stderr
    c = calls(sandbox)
    assert c[0] == "scontrol show hostnames node[1-2]"
    assert c[1].startswith("horovodrun -np 8 -H node1:4,node2:4 --start-timeout 120 python -m jobs.train_unet")


FORWARDING = [
    "slurm/unet_8gpu.sh",
    "tests/golden/slurm/unet_8gpu_mpirun.sh",
    "tests/golden/slurm/unet_8gpu_horovodrun.sh",
    "tests/golden/slurm/demo_2cpu_mpirun.sh",
]


@pytest.mark.parametrize("rel", FORWARDING)
def test_usr1_to_the_batch_shell_reaches_the_launcher(sandbox: dict, rel: str) -> None:
    """`--signal=B:USR1@...` (or scancel --batch) signals the batch shell: it must reach the ranks' launcher."""
    proc = subprocess.Popen(["bash", str(ROOT / rel)], cwd=sandbox["work"], env={**sandbox["env"], "STUB_MODE": "wait"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 20
        while not (sandbox["stub"] / "started").exists():
            assert time.time() < deadline and proc.poll() is None, "the launcher stand-in did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert (sandbox["stub"] / "got_usr1").exists(), f"USR1 did not reach the launcher\n{out}\n{err}"
    assert proc.returncode == 0, err
    assert calls(sandbox)[-1] == "scontrol requeue 42"


# ---- PBS ---------------------------------------------------------------------------------------------------------
def test_pbs_mpirun_hostfile_and_qrerun(sandbox: dict) -> None:
    p = run_script(sandbox, "slurm/pbs/unet_8gpu.sh", STUB_MODE="requeue")
    assert p.returncode == 0, p.stderr
    mpirun, rerun = calls(sandbox)
    run_dir = sandbox["work"] / "runs/unet_8gpu_77"
    hostfile = run_dir / "hostfile_77"
    assert hostfile.read_text() == "node1 slots=4\nnode2 slots=4\n"
    assert mpirun.startswith(f"mpirun -np 8 --hostfile {hostfile.relative_to(sandbox['work'])} -bind-to none")
    assert mpirun.endswith("--run-dir runs/unet_8gpu_77 --resume")
    assert rerun == "qrerun 77.pbsserver"
    assert not (run_dir / "REQUEUE").exists()


def test_pbs_resubmits_when_qrerun_is_refused(sandbox: dict) -> None:
    p = run_script(sandbox, "slurm/pbs/unet_8gpu.sh", STUB_MODE="requeue", STUB_RC_qrerun="1", TRAIN_ARGS="--epochs 3")
    assert p.returncode == 0, p.stderr
    c = calls(sandbox)
    assert c[0].endswith("--resume --epochs 3")
    assert c[1:] == [
        "qrerun 77.pbsserver",
        "qsub -v RUN_DIR=runs/unet_8gpu_77,TRAIN_ARGS=--epochs 3 slurm/pbs/unet_8gpu.sh",
    ]


def test_pbs_timer_sends_the_warning(sandbox: dict) -> None:
    """PBS has no --signal: the script's timer sends USR1 `signal_seconds` before the walltime."""
    p = run_script(sandbox, "slurm/pbs/unet_8gpu.sh", STUB_MODE="wait", PBS_WALLTIME="301")
    assert p.returncode == 0, p.stderr
    assert (sandbox["stub"] / "got_usr1").exists()
    assert calls(sandbox)[-1] == "qrerun 77.pbsserver"


def test_pbs_horovodrun_hostfile(sandbox: dict) -> None:
    p = run_script(sandbox, "tests/golden/slurm/pbs_unet_8gpu_horovodrun.sh")
    assert p.returncode == 0, p.stderr
    assert calls(sandbox)[0].startswith("horovodrun -np 8 -hostfile runs/unet_8gpu_77/hostfile_77")


def test_sweep_submits_each_count_then_the_report(sandbox: dict) -> None:
    sbatch = sandbox["stub"] / "bin/sbatch"
    sbatch.write_text(
        '#!/bin/bash\necho "sbatch $*" >>"$STUB_DIR/calls"\nn=$(wc -l <"$STUB_DIR/calls")\necho "10$n;c"\n'
    )
    sbatch.chmod(0o755)
    p = run_script(sandbox, "slurm/scaling_sweep.sh", "--epochs", "5", GPUS="1 8", RUN_DIR="oops")
    assert p.returncode == 0, p.stderr
    c = calls(sandbox)
    assert c[0] == "sbatch --parsable slurm/unet_1gpu.sh --epochs 5"
    assert c[1] == "sbatch --parsable slurm/unet_8gpu.sh --epochs 5"
    assert c[2].startswith(
        "sbatch --parsable --dependency=afterany:101:102 slurm/scaling_report.sh runs/unet_1gpu_101 runs/unet_8gpu_102"
        " --out runs/scaling_"
    )
    p = run_script(sandbox, "slurm/scaling_sweep.sh", GPUS="3")
    assert p.returncode == 1 and "no slurm/unet_3gpu.sh" in p.stderr
