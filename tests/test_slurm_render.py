"""Job-script generator: golden files for every checked-in script, `bash -n`, and the spec checks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import JobSpec, SpecError, load_site, load_spec, parse_walltime
from slurm.__main__ import check_all, main
from slurm.catalog import GPU_COUNTS, SITE_FILE, catalog, demo_spec, family_spec
from slurm.render import GENERATED_BY, render

ROOT = Path(__file__).resolve().parents[1]
CATALOG = catalog()
SCRIPTS = sorted(CATALOG)
SITE = load_site(SITE_FILE)


# ---- golden files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", SCRIPTS)
def test_golden(rel: str) -> None:
    path = ROOT / rel
    assert path.exists(), f"{rel} is missing: run `{GENERATED_BY}` and review the diff if this change is intended"
    old = path.read_text()
    if old != CATALOG[rel]:
        import difflib

        diff = "\n".join(
            list(difflib.unified_diff(old.splitlines(), CATALOG[rel].splitlines(), rel, "rendered", lineterm=""))[:30]
        )
        pytest.fail(
            f"{rel} differs from what `python -m slurm` renders now; run `{GENERATED_BY}` and review the diff if "
            f"this change is intended.\n{diff}"
        )


def test_no_stale_scripts() -> None:
    """A script in slurm/ that the catalog no longer renders is stale (a family or GPU count was removed)."""
    found = {
        str(p.relative_to(ROOT)) for d in ("slurm", "slurm/pbs", "tests/golden/slurm") for p in (ROOT / d).glob("*.sh")
    }
    stale = sorted(found - set(CATALOG))
    assert not stale, f"not rendered by the catalog any more, delete them: {stale}"


def test_expected_scripts_exist() -> None:
    for family in ("unet", "classifier"):
        for g in (1, 2, 4, 8, 16, 32, 64):
            assert f"slurm/{family}_{g}gpu.sh" in CATALOG
            assert f"slurm/pbs/{family}_{g}gpu.sh" in CATALOG
    for rel in (
        "slurm/tune_array.sh",
        "slurm/scaling_sweep.sh",
        "slurm/scaling_report.sh",
        "slurm/demo_2cpu.sh",
        "slurm/unet_2cpu.sh",
    ):
        assert rel in CATALOG


def test_check_all_clean() -> None:
    assert check_all() == []
    assert main(["--check"]) == 0


@pytest.mark.parametrize("rel", SCRIPTS)
def test_bash_syntax(rel: str) -> None:
    p = subprocess.run(["bash", "-n", str(ROOT / rel)], capture_output=True, text=True)
    assert p.returncode == 0, f"bash -n {rel}:\n{p.stderr}"


@pytest.mark.parametrize("rel", SCRIPTS)
def test_directives_before_first_command(rel: str) -> None:
    """sbatch and qsub stop reading directives at the first command line: any directive after it is ignored."""
    seen_command = False
    for n, line in enumerate(CATALOG[rel].splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            seen_command = True
        elif seen_command and re.match(r"#(SBATCH|PBS)\s", stripped):
            pytest.fail(f"{rel}:{n}: directive after the first command is ignored by the scheduler: {line}")


@pytest.mark.parametrize("rel", [r for r in SCRIPTS if not r.endswith("scaling_sweep.sh")])
def test_directive_lines_have_no_trailing_comment(rel: str) -> None:
    # Some qsub/sbatch versions take a trailing '# ...' as part of the value.
    for line in CATALOG[rel].splitlines():
        if re.match(r"#(SBATCH|PBS) ", line):
            assert " #" not in line, line


# ---- what the scripts say ----------------------------------------------------------------------------------------
def test_slurm_64gpu_script() -> None:
    text = CATALOG["slurm/unet_64gpu.sh"]
    for needle in (
        "#SBATCH --nodes=16",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --signal=USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "srun --mpi=pmix",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}",
        "RUN_DIR=${RUN_DIR:-runs/unet_64gpu_${SLURM_JOB_ID}}",
        '--run-dir "$RUN_DIR" --resume',
        'scontrol requeue "$SLURM_JOB_ID"',
        "$RUN_DIR/REQUEUE",
        "HOROVOD_FUSION_THRESHOLD",
        "NCCL_DEBUG",
        "NCCL_SOCKET_IFNAME",
    ):
        assert needle in text, needle
    # Nothing hides GPUs per rank (CUDA IPC), the trainer picks cuda:<local rank>.
    assert "export CUDA_VISIBLE_DEVICES" not in text
    assert "--gpus-per-task" not in text.replace("(--gpus-per-task", "")


def test_small_jobs_take_part_of_a_node() -> None:
    text = CATALOG["slurm/classifier_2gpu.sh"]
    assert "#SBATCH --nodes=1\n" in text and "#SBATCH --ntasks-per-node=2\n" in text
    assert "#SBATCH --gres=gpu:2\n" in text
    assert "#SBATCH --mem=64G\n" in text  # 32 GB per GPU x 2


def test_eight_gpus_per_node_variant() -> None:
    text = CATALOG["tests/golden/slurm/unet_64gpu_8pernode.sh"]
    assert "#SBATCH --nodes=8\n" in text and "#SBATCH --gres=gpu:8\n" in text


def test_mpirun_and_horovodrun_variants() -> None:
    mpi = CATALOG["tests/golden/slurm/unet_8gpu_mpirun.sh"]
    assert 'mpirun -np "$SLURM_NTASKS" -bind-to none -map-by slot' in mpi
    assert "#SBATCH --signal=B:USR1@300" in mpi  # the batch shell forwards: local ranks are no job step
    hvd = CATALOG["tests/golden/slurm/unet_8gpu_horovodrun.sh"]
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in hvd and "sed 's/$/:4/'" in hvd
    assert 'horovodrun -np "$SLURM_NTASKS" -H "$hosts"' in hvd
    assert "pgrep -P" in hvd  # the signal goes to mpirun under horovodrun's sh


def test_pbs_script() -> None:
    text = CATALOG["slurm/pbs/unet_16gpu.sh"]
    for needle in (
        "#PBS -l select=4:ncpus=32:ngpus=4:mpiprocs=4:mem=256gb",
        "#PBS -l walltime=24:00:00",
        "#PBS -r y",
        'cd "${PBS_O_WORKDIR:-.}"',
        "sort -u \"$PBS_NODEFILE\" | sed 's/$/ slots=4/'",
        'mpirun -np 16 --hostfile "$hostfile" -bind-to none -map-by slot',
        "RUN_DIR=${RUN_DIR:-runs/unet_16gpu_${JOB_ID}}",
        'qrerun "$PBS_JOBID"',
        'qsub -v RUN_DIR="$RUN_DIR" slurm/pbs/unet_16gpu.sh',
        "warn_after=$(( ${PBS_WALLTIME:-86400} - 300 ))",
    ):
        assert needle in text, needle
    assert "#SBATCH" not in text and "srun" not in text


def test_tune_array_and_sweep() -> None:
    tune = CATALOG["slurm/tune_array.sh"]
    assert "#SBATCH --array=0-7" in tune and "#SBATCH --gres=gpu:1" in tune
    assert "python -m jobs.tune --task unet --config" in tune and '--storage "$STORAGE"' in tune
    assert "%x_%A_%a.out" in tune
    sweep = CATALOG["slurm/scaling_sweep.sh"]
    assert 'sbatch --parsable "$script" "$@"' in sweep
    assert "dep=afterany:" in sweep and '--dependency="$dep" slurm/scaling_report.sh' in sweep
    assert "GPUS=${GPUS:-1 2 4 8 16 32 64}" in sweep
    assert "python -m jobs.scaling_report" in CATALOG["slurm/scaling_report.sh"]


def test_cpu_variant_is_a_catalog_product() -> None:
    text = CATALOG["slurm/demo_2cpu.sh"]
    assert "#SBATCH --ntasks=2" in text and "--gres" not in text
    assert 'python -m jobs.demo --run-dir "$RUN_DIR" --epochs 3 --resume "$@"' in text
    assert "NCCL_DEBUG" not in text  # no GPU, no NCCL knobs


def test_account_and_partition_rendered() -> None:
    spec = family_spec(SITE, "unet", 8).replace(partition="gpu", account="proj42")
    text = render(spec)
    assert "#SBATCH --partition=gpu\n" in text and "#SBATCH --account=proj42\n" in text
    pbs = render(family_spec(SITE, "unet", 8, "pbs").replace(partition="gpuq", account="proj42"))
    assert "#PBS -q gpuq\n" in pbs and "#PBS -A proj42\n" in pbs


# ---- spec checks -------------------------------------------------------------------------------------------------
def spec(**kw) -> JobSpec:
    return JobSpec(**{"name": "job", "command": "python -m jobs.demo", **kw})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"gpus": 12, "gpus_per_node": 8}, "12 GPUs do not fill whole nodes of 8"),
        ({"gpus": 6, "gpus_per_node": 4}, "use at most 4 (one node) or a multiple of 4"),
        ({"gpus": -1}, "gpus must be a whole number >= 0"),
        ({"gpus": 2.0}, "gpus must be a whole number"),
        ({"gpus": 0}, "gpus = 0 and tasks >= 1"),
        ({"gpus": 4, "gpus_per_node": 0}, "gpus_per_node must be at least 1"),
        ({"gpus": 4, "tasks": 4}, "tasks (4) is for CPU jobs"),
        ({"cpus_per_task": 0}, "cpus_per_task must be at least 1"),
        ({"walltime": "1 day"}, "walltime must look like HH:MM:SS"),
        ({"walltime": "10:75:00"}, "walltime must look like HH:MM:SS"),
        ({"walltime": "00:04:00", "signal_seconds": 300}, "must be shorter than the walltime"),
        ({"signal_seconds": 70000, "walltime": "2-00:00:00"}, "at most 65535"),
        ({"mem": "256GB"}, "mem must be a number with a unit"),
        ({"scheduler": "lsf"}, "scheduler must be one of slurm, pbs"),
        ({"scheduler": "pbs", "launcher": "srun"}, "srun is Slurm's launcher"),
        ({"launcher": "torchrun"}, "launcher must be one of"),
        ({"launcher": "none", "gpus": 4}, "launcher 'none' runs one process"),
        ({"array": "0-7", "scheduler": "pbs"}, "array jobs are rendered for Slurm only"),
        ({"array": "zero-seven"}, "array must be a Slurm range"),
        ({"run_dir": False}, "a warning signal needs a run folder"),
        ({"partition": "gpu; rm -rf /"}, "has characters a scheduler directive does not take"),
        ({"command": "  "}, "command is empty"),
    ],
)
def test_bad_specs(kw: dict, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)) as e:
        spec(**kw)
    assert "'job'" in str(e.value)  # the message names the spec


def test_bad_name() -> None:
    with pytest.raises(SpecError, match="job spec name '8 gpus'"):
        JobSpec(name="8 gpus", command="x")


@pytest.mark.parametrize(
    ("gpus", "per_node", "nodes", "ranks_per_node"),
    [(1, 4, 1, 1), (2, 4, 1, 2), (4, 4, 1, 4), (8, 4, 2, 4), (64, 4, 16, 4), (64, 8, 8, 8)],
)
def test_nodes_follow_gpus(gpus: int, per_node: int, nodes: int, ranks_per_node: int) -> None:
    s = spec(gpus=gpus, gpus_per_node=per_node)
    assert (s.nodes, s.ranks_per_node, s.ranks) == (nodes, ranks_per_node, gpus)


def test_cpu_spec_and_defaults() -> None:
    s = demo_spec(SITE)
    assert (s.gpus, s.ranks, s.nodes, s.launcher) == (0, 2, 1, "srun")
    assert spec(scheduler="pbs").launcher == "mpirun"
    assert spec(scheduler="pbs").script == "slurm/pbs/job.sh"


def test_walltime() -> None:
    assert parse_walltime("24:00:00") == 86400
    assert parse_walltime("1-02:03:04") == 93784
    assert parse_walltime("100:00:00") == 360000
    pbs = render(spec(scheduler="pbs", walltime="2-00:00:00"))
    assert "#PBS -l walltime=48:00:00" in pbs


def test_every_catalog_gpu_count_is_valid_at_8_per_node() -> None:
    for g in GPU_COUNTS:
        family_spec(SITE, "unet", g, gpus_per_node=8)


# ---- spec files and the command line -----------------------------------------------------------------------------
def test_load_spec_file(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(
        'name: myjob\ncommand: python -m jobs.demo --run-dir "$RUN_DIR" --resume\ngpus: 8\nsetup: ["module load x"]\n'
    )
    s = load_spec(f, scheduler="pbs")
    assert (s.scheduler, s.gpus, s.nodes, s.setup) == ("pbs", 8, 2, ("module load x",))
    f.write_text("name: myjob\ncommand: x\ngpu: 8\n")
    with pytest.raises(SpecError, match=r"job.yaml: unknown field\(s\) gpu"):
        load_spec(f)
    f.write_text("name: myjob\ncommand: x\ngpus: 12\ngpus_per_node: 8\n")
    with pytest.raises(SpecError, match=r"job.yaml: job spec 'myjob': 12 GPUs do not fill whole nodes of 8"):
        load_spec(f)
    with pytest.raises(FileNotFoundError, match="nope.yaml does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_site_file_typo(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text("partiton: gpu\n")
    with pytest.raises(SpecError, match="unknown field"):
        load_site(f)


def test_cli_spec_and_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "job.yaml"
    f.write_text('name: myjob\ncommand: python -m jobs.demo --run-dir "$RUN_DIR" --resume\ngpus: 16\n')
    out = tmp_path / "myjob.sh"
    assert main(["--spec", str(f), "--launcher", "mpirun", "-o", str(out)]) == 0
    text = out.read_text()
    assert "#SBATCH --nodes=4" in text and "mpirun -np" in text
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    assert main(["--job", "unet", "--gpus", "64", "--gpus-per-node", "8", "--scheduler", "pbs"]) == 0
    assert "#PBS -l select=8:ncpus=64:ngpus=8:mpiprocs=8:mem=512gb" in capsys.readouterr().out
    assert main(["--job", "unet", "--gpus", "12", "--gpus-per-node", "8"]) == 2
    assert "12 GPUs do not fill whole nodes of 8" in capsys.readouterr().err
    assert main(["--job", "vit", "--gpus", "8"]) == 2
    assert "no job family 'vit'" in capsys.readouterr().err


def test_python_m_entry_point() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "slurm", "--job", "classifier", "--gpus", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("#!/bin/bash\n# classifier_4gpu:")
