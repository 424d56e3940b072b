"""The checked-in job scripts: which specs exist, built from the job families here and the site settings.

`catalog()` maps each script's path in the repository to its rendered text; `python -m slurm --all` writes
them and the golden-file tests compare them. Site specifics (partition, queue, account, GPUs per node, module loads)
live in slurm/specs/site.yaml so that adapting the scripts to a cluster is one edit and one render.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .render import render, render_sweep
from .spec import JobSpec, Site, SpecError, load_site

__all__ = [
    "GPU_COUNTS",
    "FAMILIES",
    "SITE_FILE",
    "Family",
    "family_spec",
    "demo_spec",
    "unet_cpu_spec",
    "tune_spec",
    "report_spec",
    "catalog",
]

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
SITE_FILE = Path(__file__).resolve().parent / "specs" / "site.yaml"
SOURCE = "slurm/catalog.py and slurm/specs/site.yaml"


@dataclass(frozen=True)
class Family:
    """A training job rendered at every GPU count."""

    description: str  # one line for the scripts' header
    command: str  # the job command line (docs/CONTRACT.md), always with --run-dir "$RUN_DIR" --resume
    cpus_per_task: int  # CPUs per rank (data loading + threads)
    mem_per_gpu: int  # GB of host memory per GPU; a node asks for this x its GPUs
    walltime: str  # per job; a longer run goes on through requeues


FAMILIES = {
    "unet": Family(
        "3D U-Net lung-nodule segmentation",
        'python -m jobs.train_unet --config jobs/configs/unet_lung.yaml --run-dir "$RUN_DIR" --resume',
        cpus_per_task=8,
        mem_per_gpu=64,
        walltime="24:00:00",
    ),
    "classifier": Family(
        "breast-ultrasound classifier, 5-fold cross-validation",
        'python -m jobs.train_classifier --data data/busi --model mobilenet_v2 --folds 5 --run-dir "$RUN_DIR" --resume',
        cpus_per_task=8,
        mem_per_gpu=32,
        walltime="12:00:00",
    ),
}


def _site_fields(site: Site, scheduler: str) -> dict:
    return {
        "partition": site.queue if scheduler == "pbs" else site.partition,
        "account": site.account,
        "setup": site.setup,
    }


def family_spec(site: Site, family: str, gpus: int, scheduler: str = "slurm", **changes) -> JobSpec:
    """The `family` training job at `gpus` GPUs for `site` (`changes` override any field, e.g. launcher)."""
    if family not in FAMILIES:
        raise SpecError(f"no job family {family!r}; known: {', '.join(FAMILIES)}")
    f = FAMILIES[family]
    gpn = changes.pop("gpus_per_node", site.gpus_per_node)
    per_node = min(gpus, gpn) if gpus > 0 and gpn > 0 else 1
    fields = {
        "name": f"{family}_{gpus}gpu",
        "command": f.command,
        "description": f.description,
        "scheduler": scheduler,
        "gpus": gpus,
        "gpus_per_node": gpn,
        "cpus_per_task": f.cpus_per_task,
        "mem": f"{f.mem_per_gpu * per_node}G",
        "walltime": f.walltime,
        "signal_seconds": site.signal_seconds,
        **_site_fields(site, scheduler),
    }
    fields.update(changes)
    return JobSpec(**fields)


def demo_spec(site: Site, **changes) -> JobSpec:
    """The CPU variant the Slurm cluster test submits: the demo trainer, 2 ranks, no GPU, default partition."""
    fields = {
        "name": "demo_2cpu",
        "command": 'python -m jobs.demo --run-dir "$RUN_DIR" --epochs 3 --resume',
        "description": "the toy demo trainer on CPUs (try a cluster's set-up and the preemption path)",
        "gpus": 0,
        "tasks": 2,
        "cpus_per_task": 1,
        "mem": "4G",
        "walltime": "00:30:00",
        "signal_seconds": 60,
        "account": site.account,
        "setup": site.setup,
    }
    fields.update(changes)
    return JobSpec(**fields)


def unet_cpu_spec(site: Site) -> JobSpec:
    """The U-Net job on CPUs with the demo preset (phantom CT): the CI check of the U-Net job template."""
    return JobSpec(
        name="unet_2cpu",
        description="3D U-Net on CPUs with the demo preset (phantom CT; make them with jobs.make_phantoms)",
        command='python -m jobs.train_unet --config jobs/configs/unet_demo.yaml --run-dir "$RUN_DIR" --resume',
        gpus=0,
        tasks=2,
        cpus_per_task=1,
        mem="8G",
        walltime="02:00:00",
        signal_seconds=120,
        account=site.account,
        setup=site.setup,
    )


def tune_spec(site: Site, workers: int = 8) -> JobSpec:
    """An Optuna worker array: each task one single-GPU worker on the shared study storage."""
    return JobSpec(
        name="tune_array",
        description=f"Optuna study of the U-Net, {workers} single-GPU workers as a job array",
        command=(
            # --max-trials caps the whole study: a requeued task does not run past it.
            "python -m jobs.tune --task unet --config jobs/configs/unet_lung.yaml "
            f"--trials 4 --max-trials {4 * workers} "
            '--study "$STUDY" --storage "$STORAGE"'
        ),
        gpus=1,
        gpus_per_node=site.gpus_per_node,
        cpus_per_task=8,
        mem="64G",
        walltime="24:00:00",
        array=f"0-{workers - 1}",
        run_dir=False,
        signal_seconds=0,
        requeue=True,
        prelude=(
            "# Every array task is one worker of the same study (trials are shared through the storage).",
            "STUDY=${STUDY:-unet_lung}",
            "# A journal file on a shared file system, or an RDB URL such as postgresql://user@host/optuna (better",
            "# with many nodes: journal-file locks over NFS are fragile).",
            "STORAGE=${STORAGE:-runs/tune/unet_lung.journal}",
            'if [[ $STORAGE != *://* ]]; then mkdir -p "$(dirname "$STORAGE")"; fi',
            "export STUDY STORAGE",
        ),
        **_site_fields(site, "slurm"),
    )


def report_spec(site: Site) -> JobSpec:
    """The Dice scaling report job that the sweep submits after the training jobs."""
    return JobSpec(
        name="scaling_report",
        description="Dice scaling report over run folders (submitted by slurm/scaling_sweep.sh)",
        command="python -m jobs.scaling_report",
        gpus=0,
        tasks=1,
        cpus_per_task=2,
        mem="16G",
        walltime="01:00:00",
        launcher="none",
        run_dir=False,
        signal_seconds=0,
        requeue=False,
        account=site.account,
        setup=site.setup,
    )


def catalog(site: Site | None = None) -> dict[str, str]:
    """Every checked-in script: repository path -> rendered text."""
    site = site or load_site(SITE_FILE)
    out: dict[str, str] = {}
    for family in FAMILIES:
        for gpus in GPU_COUNTS:
            out[f"slurm/{family}_{gpus}gpu.sh"] = render(family_spec(site, family, gpus), SOURCE)
    for family in FAMILIES:
        for gpus in GPU_COUNTS:
            out[f"slurm/pbs/{family}_{gpus}gpu.sh"] = render(family_spec(site, family, gpus, "pbs"), SOURCE)
    out["slurm/demo_2cpu.sh"] = render(demo_spec(site), SOURCE)
    out["slurm/unet_2cpu.sh"] = render(unet_cpu_spec(site), SOURCE)
    out["slurm/tune_array.sh"] = render(tune_spec(site), SOURCE)
    out["slurm/scaling_report.sh"] = render(report_spec(site), SOURCE)
    out["slurm/scaling_sweep.sh"] = render_sweep("unet", GPU_COUNTS, "slurm/scaling_report.sh", SOURCE)
    # The other launch paths, kept as golden files only (render one for use with --job ... --launcher ...).
    variants = {
        "unet_8gpu_mpirun": family_spec(site, "unet", 8, launcher="mpirun"),
        "unet_8gpu_horovodrun": family_spec(site, "unet", 8, launcher="horovodrun"),
        "unet_64gpu_8pernode": family_spec(site, "unet", 64, gpus_per_node=8),
        "pbs_unet_8gpu_horovodrun": family_spec(site, "unet", 8, "pbs", launcher="horovodrun"),
        "demo_2cpu_mpirun": demo_spec(site, launcher="mpirun"),
    }
    for name, spec in variants.items():
        path = f"tests/golden/slurm/{name}.sh"
        out[path] = render(spec.replace(script=path), SOURCE)
    return out
