"""Render Slurm (sbatch) and PBS (qsub) scripts from a `JobSpec` (the command line is `python -m slurm`).

A rendered script has the same sections on both schedulers: directives (each with a comment), site set-up,
environment, run folder, launch, and the requeue after a preemption checkpoint (docs/CONTRACT.md: the trainer
writes $RUN_DIR/REQUEUE and exits 0 when a warning signal made it stop early).
"""

from __future__ import annotations

from pathlib import Path

from .spec import JobSpec

__all__ = ["render", "render_sweep", "ROOT", "GENERATED_BY"]

ROOT = Path(__file__).resolve().parents[1]
GENERATED_BY = "python -m slurm --all"
_WIDTH = 110  # rendered comment lines stay under this


def _wrap_comment(text: str, indent: str = "") -> list[str]:
    """`text` as '# ' comment lines no wider than _WIDTH."""
    lines, line = [], ""
    for word in text.split():
        if line and len(indent) + 2 + len(line) + 1 + len(word) > _WIDTH:
            lines.append(f"{indent}# {line}")
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(f"{indent}# {line}")
    return lines


def _n(count: int, word: str) -> str:
    """'1 GPU', '8 GPUs'."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _section(title: str) -> str:
    head = f"# ---- {title} "
    return head + "-" * max(4, _WIDTH - len(head))


def _directive(prefix: str, text: str, why: str = "") -> list[str]:
    """A scheduler directive, with its comment on the line above (sbatch/qsub do not all take trailing comments)."""
    return [*(_wrap_comment(why) if why else []), f"{prefix} {text}"]


# ---- shared pieces ---------------------------------------------------------------------------------------------
def _header(spec: JobSpec, source: str) -> list[str]:
    what = spec.description or spec.name
    if spec.gpus:
        shape = f"{_n(spec.gpus, 'GPU')} on {_n(spec.nodes, 'node')} x {spec.ranks_per_node}, one Horovod rank per GPU"
    else:
        shape = f"{_n(spec.ranks, 'CPU rank')} on one node, no GPU"
    launch = "one process" if spec.launcher == "none" else f"launched with {spec.launcher}"
    if spec.scheduler == "slurm":
        submit = f"sbatch {spec.script} [extra flags for the command]"
        resume = f"sbatch --export=ALL,RUN_DIR=<run folder> {spec.script}"
    else:
        submit = f'qsub [-v TRAIN_ARGS="extra flags"] {spec.script}'
        resume = f"qsub -v RUN_DIR=<run folder> {spec.script}"
    lines = ["#!/bin/bash", f"# {spec.name}: {what}.", f"# {shape}; {launch}.", "#"]
    lines += [f"# Submit from the repository root:  {submit}"]
    if spec.run_dir:
        lines += [f"# Continue an earlier run folder:   {resume}"]
    lines += _wrap_comment(
        f"Rendered by `python -m slurm` from {source or 'a job spec'}: change the spec and render again "
        "rather than editing this file (golden-file tests compare the two)."
    )
    return lines


def _site(spec: JobSpec) -> list[str]:
    lines = [_section("site set-up: modules, conda or venv (slurm/specs/site.yaml)")]
    lines += _wrap_comment(
        "Before `set -u`: module and conda scripts often read unset variables. Horovod must find the same MPI "
        "and CUDA at run time as at build time."
    )
    lines += list(spec.setup) or ["# (no site set-up lines in this spec)"]
    return lines


# (name, value, comment): the tuning variables, each explained once.
def _env_vars(spec: JobSpec, omp: str) -> list[tuple[str, str, str]]:
    out = [("OMP_NUM_THREADS", omp, "One OpenMP/intra-op thread per CPU given to each rank.")]
    if spec.gpus:
        out += [
            ("NCCL_DEBUG", "WARN", "NCCL warnings only; INFO once shows the transport it chose (IB, RoCE or sockets)."),
            (
                "#NCCL_SOCKET_IFNAME",
                "ib0",
                "Pin NCCL's socket traffic to one interface when it picks a wrong one ('^docker0,lo' excludes).",
            ),
        ]
    out += [
        (
            "HOROVOD_FUSION_THRESHOLD",
            "134217728",
            "Gradients ready together go in one allreduce of up to 128 MiB (Horovod's default; 0 turns fusion off).",
        ),
        (
            "HOROVOD_CYCLE_TIME",
            "1",
            "Milliseconds Horovod waits to gather ready tensors for one fusion (default 1); a few ms batch more on "
            "a slow network.",
        ),
        (
            "HOROVOD_STALL_CHECK_TIME_SECONDS",
            "60",
            "Warn when ranks wait this long for each other on a tensor (uneven batches, a rank-only branch).",
        ),
        (
            "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
            "600",
            "End the job rather than hang until the time limit when such a stall lasts this long.",
        ),
        ("PYTHONUNBUFFERED", "1", "Log lines appear when printed, not when a buffer fills."),
    ]
    return out


def _environment(spec: JobSpec, omp: str) -> list[str]:
    lines = [_section("environment")]
    for name, value, why in _env_vars(spec, omp):
        lines += _wrap_comment(why)
        lines.append(f"# export {name[1:]}={value}" if name.startswith("#") else f"export {name}={value}")
    return lines


def _mpirun_exports(spec: JobSpec) -> list[str]:
    names = ["PATH", "LD_LIBRARY_PATH", "PYTHONPATH", *(n.lstrip("#") for n, _, _ in _env_vars(spec, ""))]
    rows, row = [], "for v in"
    for name in names:
        if len(row) + len(name) > 100:
            rows.append(row + " \\")
            row = "   "
        row += f" {name}"
    rows.append(row + "; do")
    return [
        "# mpirun passes on only the variables named with -x (and warns about unset ones): collect the set ones.",
        "xvars=()",
        *rows,
        '    if [[ -v $v ]]; then xvars+=(-x "$v"); fi',
        "done",
    ]


def _command(spec: JobSpec) -> str:
    extra = '"$@"' if spec.scheduler == "slurm" else "${TRAIN_ARGS:-}"
    return f"{spec.command} {extra}"


def _forward(spec: JobSpec) -> list[str]:
    """`forward SIG`: pass a signal that reached this shell on to the launcher (which passes it to the ranks)."""
    if spec.launcher == "horovodrun":
        return [
            "# horovodrun replaces itself with `sh -c mpirun ...`; sh would die of USR1, so the signal goes to the",
            "# mpirun below it, which passes USR1 on to every rank.",
            'forward() { kill -s "$1" "$(pgrep -P "$launcher" -x mpirun || echo "$launcher")" 2>/dev/null || true; }',
        ]
    return ['forward() { kill -s "$1" "$launcher" 2>/dev/null || true; }']


def _wait(spec: JobSpec) -> list[str]:
    """Wait for the background launcher, whatever signals arrive meanwhile; its exit status ends up in rc."""
    cancel = "scancel, time limit" if spec.scheduler == "slurm" else "qdel, walltime"
    by = "e.g. scancel --batch --signal=USR1 <job>" if spec.scheduler == "slurm" else "e.g. qsig -s USR1 <job>"
    return [
        f"# A USR1 sent to this shell ({by}) goes on to the ranks.",
        "trap 'forward USR1' USR1",
        f"# TERM ({cancel}) reaches the ranks from the scheduler itself; this shell only waits for them.",
        "trap 'echo \"$(date -Is) TERM: waiting for the ranks to checkpoint\"' TERM",
        "rc=0",
        'wait "$launcher" || rc=$?',
        "# A trapped signal ends `wait` early; wait again until the launcher itself has exited.",
        'while kill -0 "$launcher" 2>/dev/null; do rc=0; wait "$launcher" || rc=$?; done',
    ]


def _stall_requeue(slurm: bool) -> list[str]:
    """A rank ended by the hung-rank watchdog: turn its exit into a requeue, as after a node failure."""
    cap = " && ${SLURM_RESTART_COUNT:-0} -lt 5" if slurm else ""
    return [
        "",
        _section("requeue after a hung rank"),
        "# The trainer's watchdog (--stall-timeout) ended a rank that waited too long for another one with exit 75",
        "# and left $RUN_DIR/STALLED; the launcher ended the other ranks. Requeue as after a node failure: the job",
        "# resumes from the newest checkpoint"
        + (" (at most 5 restarts, so a hang that always comes back stops)." if slurm else "."),
        f"if [[ ( $rc -eq 75 || -f $RUN_DIR/STALLED ){cap} ]]; then",
        '    echo "$(date -Is) a rank hung (exit $rc): $(cat "$RUN_DIR/STALLED" 2>/dev/null | head -c 400)"',
        '    rm -f "$RUN_DIR/STALLED"',
        '    touch "$RUN_DIR/REQUEUE"',
        "    rc=0",
        "fi",
    ]


# ---- Slurm -----------------------------------------------------------------------------------------------------
def _slurm_directives(spec: JobSpec) -> list[str]:
    d = lambda text, why="": _directive("#SBATCH", text, why)
    lines = [_section("resources"), *d(f"--job-name={spec.name}")]
    if spec.gpus:
        lines += d(
            f"--nodes={spec.nodes}",
            f"{_n(spec.gpus, 'GPU')} = {_n(spec.nodes, 'node')} x {spec.ranks_per_node}, one rank per GPU.",
        )
        lines += d(f"--ntasks-per-node={spec.ranks_per_node}")
        lines += d(
            f"--gres=gpu:{spec.ranks_per_node}",
            "Every rank sees all of its node's GPUs and takes cuda:<local rank>; no per-rank CUDA_VISIBLE_DEVICES "
            "(--gpus-per-task, --gpu-bind), which would disable CUDA IPC between the ranks.",
        )
    else:
        lines += d("--nodes=1", f"CPU job: {_n(spec.ranks, 'rank')} on one node, no GPU.")
        lines += d(f"--ntasks={spec.ranks}")
    lines += d(f"--cpus-per-task={spec.cpus_per_task}", "CPUs per rank: data-loading workers and intra-op threads.")
    if spec.mem:
        lines += d(f"--mem={spec.mem}", "Memory per node.")
    lines += d(f"--time={spec.walltime}")
    if spec.partition:
        lines += d(f"--partition={spec.partition}")
    else:
        lines += _wrap_comment("No partition set: the cluster's default partition (set one in slurm/specs/site.yaml).")
    if spec.account:
        lines += d(f"--account={spec.account}")
    else:
        lines += ["# Charged account: uncomment, or set `account` in slurm/specs/site.yaml."]
        lines += ["##SBATCH --account=ACCOUNT"]
    if spec.array:
        lines += d(f"--array={spec.array}", "One array task per index, each an independent job with the same script.")
    log = spec.log or ("%x_%A_%a.out" if spec.array else "%x_%j.out")
    why = "Log in the submission folder (%x job name, %j job id, %A_%a array job and task)"
    lines += d(f"--output={log}", why + (", appended to across requeues." if spec.requeue else "."))
    if spec.requeue:
        lines += d("--open-mode=append")
    if spec.requeue or spec.signal_seconds:
        lines += [_section("preemption and requeue")]
    if spec.signal_seconds:
        if spec.launcher == "srun":
            why = (
                f"USR1 goes to every rank (the job step's tasks) {spec.signal_seconds} s before the time limit: the "
                "trainer checkpoints, writes $RUN_DIR/REQUEUE and exits 0; this script then requeues the job."
            )
            lines += d(f"--signal=USR1@{spec.signal_seconds}", why)
        else:
            started = "the process runs" if spec.launcher == "none" else f"ranks that {spec.launcher} starts here run"
            why = (
                f"USR1 goes to this batch shell (B:) {spec.signal_seconds} s before the time limit: {started} inside "
                "the batch step, not in a job step of their own, so the shell forwards it "
                f"({'to the process' if spec.launcher == 'none' else 'to mpirun, which passes it on to every rank'})."
            )
            lines += d(f"--signal=B:USR1@{spec.signal_seconds}", why)
    if spec.requeue:
        why = (
            "The job may go back to the queue: requeued by this script after a preemption checkpoint, by Slurm "
            "after a node failure; either way it restarts with the same job id and resumes."
            if spec.run_dir
            else "The job may go back to the queue: Slurm requeues it after a node failure and it starts again."
        )
        lines += d("--requeue", why)
    else:
        lines += d("--no-requeue")
    return lines


def _slurm_launch(spec: JobSpec) -> list[str]:
    cmd = _command(spec)
    lines = [_section("launch")]
    if spec.launcher == "srun":
        lines += [
            "# srun starts the ranks; Horovod's MPI learns ranks and hosts from Slurm's PMIx (`srun --mpi=list`",
            "# shows what the site has: pmix, pmix_v4 or pmi2). --cpus-per-task again: srun 22.05 to 23.02 does",
            "# not take it from sbatch and would pin each rank to one CPU. --kill-on-bad-exit: one failed rank ends",
            "# the step instead of leaving the others waiting in an allreduce.",
            'srun --mpi=pmix --ntasks="$SLURM_NTASKS" --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \\',
            f"    {cmd} &",
        ]
    elif spec.launcher == "mpirun":
        lines += _mpirun_exports(spec)
        lines += [
            "# Open MPI reads the allocation from Slurm (and starts remote ranks through it). -bind-to none: each",
            "# rank uses its CPUs freely; -map-by slot: consecutive ranks fill a node first. ob1/^openib: MPI's own",
            "# traffic over TCP (NCCL still uses InfiniBand/RoCE for the gradients).",
            "# As root (containers) also: export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.",
            'mpirun -np "$SLURM_NTASKS" -bind-to none -map-by slot -mca pml ob1 -mca btl ^openib "${xvars[@]}" \\',
            f"    {cmd} &",
        ]
    elif spec.launcher == "horovodrun":
        lines += [
            f"# horovodrun's host list: the allocation's nodes with {_n(spec.ranks_per_node, 'slot')} each. With",
            "# more than one node horovodrun first checks passwordless SSH to each of them (then mpirun starts the",
            "# ranks through Slurm). It passes the whole environment on with -x.",
            'hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed \'s/$/:'
            f"{spec.ranks_per_node}/' | paste -sd, -)",
            'horovodrun -np "$SLURM_NTASKS" -H "$hosts" --start-timeout 120 \\',
            f"    {cmd} &",
        ]
    else:
        lines += ["# One process: no MPI launcher.", f"{cmd} &"]
    lines.append("launcher=$!")
    return lines + _forward(spec) + _wait(spec)


def _run_folder(spec: JobSpec, job_id: str) -> list[str]:
    return [
        _section("run folder"),
        "# One per job id: a requeued job keeps its id, comes back to the same folder and resumes there.",
        f"RUN_DIR=${{RUN_DIR:-{spec.run_root}/{spec.name}_{job_id}}}",
        "export RUN_DIR",
        'mkdir -p "$RUN_DIR"',
    ]


def _render_slurm(spec: JobSpec, source: str) -> str:
    job_id = "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" if spec.array else "${SLURM_JOB_ID}"
    lines = _header(spec, source) + [""] + _slurm_directives(spec) + [""] + _site(spec)
    lines += [
        "",
        "set -euo pipefail",
        "if [[ ! -d jobs ]]; then",
        f'    echo "{spec.name}: submit from the repository root (no jobs/ in $PWD)" >&2',
        "    exit 1",
        "fi",
        "",
    ]
    lines += _environment(spec, f"${{SLURM_CPUS_PER_TASK:-{spec.cpus_per_task}}}")
    lines += [""]
    if spec.run_dir:
        lines += _run_folder(spec, job_id) + [""]
    if spec.prelude:
        lines += [_section("job variables"), *spec.prelude, ""]
    where = ", run folder $RUN_DIR" if spec.run_dir else ""
    restart = "(restart ${SLURM_RESTART_COUNT:-0})"
    lines += [f'echo "$(date -Is) job {job_id} {restart} on $SLURM_JOB_NODELIST{where}"', ""]
    lines += _slurm_launch(spec)
    if spec.run_dir and spec.requeue:
        lines += _stall_requeue(slurm=True)
        lines += [
            "",
            _section("requeue after a preemption checkpoint"),
            "# The trainer left $RUN_DIR/REQUEUE: it was signalled, saved checkpoints/last.pt and stopped early.",
            "# Requeue this job (same id, same run folder; the command always has --resume). A requeue refused",
            "# (job cancelled, time limit already reached) leaves the checkpoint for a manual resubmission.",
            "if [[ $rc -eq 0 && -f $RUN_DIR/REQUEUE ]]; then",
            '    rm -f "$RUN_DIR/REQUEUE"',
            f'    echo "$(date -Is) preempted: requeueing job {job_id}"',
            '    if ! scontrol requeue "$SLURM_JOB_ID"; then',
            f'        echo "requeue refused: continue with  sbatch --export=ALL,RUN_DIR=$RUN_DIR {spec.script}" >&2',
            "        exit 1",
            "    fi",
            "fi",
        ]
    lines += ['exit "$rc"', ""]
    return "\n".join(lines)


# ---- PBS -------------------------------------------------------------------------------------------------------
def _pbs_mem(mem: str) -> str:
    return mem[:-1] + {"K": "kb", "M": "mb", "G": "gb", "T": "tb"}[mem[-1]]


def _pbs_walltime(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _pbs_directives(spec: JobSpec) -> list[str]:
    d = lambda text, why="": _directive("#PBS", text, why)
    ncpus = spec.ranks_per_node * spec.cpus_per_task
    chunk = f"{spec.nodes}:ncpus={ncpus}"
    if spec.gpus:
        chunk += f":ngpus={spec.ranks_per_node}"
    chunk += f":mpiprocs={spec.ranks_per_node}"
    if spec.mem:
        chunk += f":mem={_pbs_mem(spec.mem)}"
    torque = f"nodes={spec.nodes}:ppn={ncpus}" + (f":gpus={spec.ranks_per_node}" if spec.gpus else "")
    lines = [_section("resources"), *d(f"-N {spec.name}")]
    lines += d(
        f"-l select={chunk}",
        f"{_n(spec.nodes, 'node')} (chunks) x {_n(spec.ranks_per_node, 'rank')}; ncpus = ranks x {spec.cpus_per_task} "
        f"CPUs, mpiprocs = ranks per node{', mem per node' if spec.mem else ''}. Torque instead: "
        f"-l {torque}.",
    )
    lines += d(f"-l walltime={_pbs_walltime(spec.walltime_seconds)}")
    if spec.partition:
        lines += d(f"-q {spec.partition}")
    else:
        lines += ["# No queue set: the server's default queue (set `queue` in slurm/specs/site.yaml)."]
    if spec.account:
        lines += d(f"-A {spec.account}")
    else:
        lines += ["# Charged account: uncomment, or set `account` in slurm/specs/site.yaml.", "##PBS -A ACCOUNT"]
    lines += d("-j oe", "One log for stdout and stderr, in the submission folder.")
    if spec.requeue:
        lines += [_section("preemption and requeue")]
        lines += d(
            "-r y",
            "Rerunnable: the server reruns the job (same id, same run folder) after a node failure, and this script "
            "reruns it after a preemption checkpoint. PBS has no warning signal before the walltime; a timer in "
            "the script sends USR1 instead.",
        )
    else:
        lines += d("-r n")
    return lines


def _pbs_launch(spec: JobSpec) -> list[str]:
    cmd = _command(spec)
    lines = [
        _section("launch"),
        "# qsub passes no arguments to a script: TRAIN_ARGS (qsub -v) adds flags to the command.",
    ]
    if spec.launcher in ("mpirun", "horovodrun"):
        lines += [
            f"# One line per node with {_n(spec.ranks_per_node, 'slot')}: $PBS_NODEFILE repeats a host once per",
            "# mpiprocs (PBS Pro) or once per CPU (Torque ppn); horovodrun takes only `host slots=N` lines.",
            'hostfile="$RUN_DIR/hostfile_$JOB_ID"' if spec.run_dir else 'hostfile="${TMPDIR:-/tmp}/hostfile_$JOB_ID"',
            f'sort -u "$PBS_NODEFILE" | sed \'s/$/ slots={spec.ranks_per_node}/\' >"$hostfile"',
        ]
    if spec.launcher == "mpirun":
        lines += _mpirun_exports(spec)
        lines += [
            "# -bind-to none: each rank uses its CPUs freely; -map-by slot: consecutive ranks fill a node first.",
            "# ob1/^openib: MPI's own traffic over TCP (NCCL still uses InfiniBand/RoCE for the gradients).",
            f'mpirun -np {spec.ranks} --hostfile "$hostfile" -bind-to none -map-by slot \\',
            '    -mca pml ob1 -mca btl ^openib "${xvars[@]}" \\',
            f"    {cmd} &",
        ]
    elif spec.launcher == "horovodrun":
        lines += [
            "# horovodrun needs passwordless SSH between the nodes; it passes the whole environment on with -x.",
            f'horovodrun -np {spec.ranks} -hostfile "$hostfile" --start-timeout 120 \\',
            f"    {cmd} &",
        ]
    else:
        lines += ["# One process: no MPI launcher.", f"{cmd} &"]
    lines.append("launcher=$!")
    lines += _forward(spec)
    if spec.signal_seconds:
        lines += [
            f"# PBS sends no warning before the walltime: send USR1 ourselves {spec.signal_seconds} s before it.",
            "# Torque exports the real walltime as PBS_WALLTIME; PBS Pro does not, so the rendered one is the default.",
            f"warn_after=$(( ${{PBS_WALLTIME:-{spec.walltime_seconds}}} - {spec.signal_seconds} ))",
            "# The timer's own sleep ends with it (a stray sleep would hold the job's output open).",
            "{",
            "    trap 'kill $! 2>/dev/null; exit 0' TERM",
            '    sleep "$(( warn_after > 0 ? warn_after : 0 ))" &',
            '    wait "$!" && forward USR1',
            "} >/dev/null 2>&1 &",
            "timer=$!",
        ]
    lines += _wait(spec)
    if spec.signal_seconds:
        lines += ['kill "$timer" 2>/dev/null || true']
    return lines


def _render_pbs(spec: JobSpec, source: str) -> str:
    lines = _header(spec, source) + [""] + _pbs_directives(spec) + [""]
    lines += [
        "# PBS starts the job in $HOME: go back to where it was submitted (the repository root).",
        'cd "${PBS_O_WORKDIR:-.}"',
        "",
    ]
    lines += _site(spec)
    lines += [
        "",
        "set -euo pipefail",
        "if [[ ! -d jobs ]]; then",
        f'    echo "{spec.name}: submit from the repository root (no jobs/ in $PWD)" >&2',
        "    exit 1",
        "fi",
        "# 1234.server -> 1234",
        "JOB_ID=${PBS_JOBID%%.*}",
        "",
    ]
    lines += _environment(spec, str(spec.cpus_per_task)) + [""]
    if spec.run_dir:
        lines += _run_folder(spec, "${JOB_ID}") + [""]
    if spec.prelude:
        lines += [_section("job variables"), *spec.prelude, ""]
    lines += [
        f'echo "$(date -Is) job $PBS_JOBID on $(sort -u "$PBS_NODEFILE" | paste -sd, -)'
        f'{", run folder $RUN_DIR" if spec.run_dir else ""}"',
        "",
    ]
    lines += _pbs_launch(spec)
    if spec.run_dir and spec.requeue:
        lines += _stall_requeue(slurm=False)
        lines += [
            "",
            _section("requeue after a preemption checkpoint"),
            "# The trainer left $RUN_DIR/REQUEUE: it was signalled, saved checkpoints/last.pt and stopped early.",
            "# qrerun puts this job back in the queue with the same id (so the same run folder), but many sites",
            "# allow it to operators only; then submit a new job that continues in this run folder.",
            "if [[ $rc -eq 0 && -f $RUN_DIR/REQUEUE ]]; then",
            '    rm -f "$RUN_DIR/REQUEUE"',
            '    echo "$(date -Is) preempted: rerunning job $PBS_JOBID"',
            '    if ! qrerun "$PBS_JOBID"; then',
            "        if [[ -n ${TRAIN_ARGS:-} ]]; then",
            f'            qsub -v RUN_DIR="$RUN_DIR",TRAIN_ARGS="$TRAIN_ARGS" {spec.script}',
            "        else",
            f'            qsub -v RUN_DIR="$RUN_DIR" {spec.script}',
            "        fi",
            "    fi",
            "fi",
        ]
    lines += ['exit "$rc"', ""]
    return "\n".join(lines)


def render(spec: JobSpec, source: str = "") -> str:
    """The text of `spec`'s job script (sbatch or qsub, as `spec.scheduler` says).

    Args:
        spec: the job.
        source: where the spec came from, named in the script's header.
    """
    return _render_slurm(spec, source) if spec.scheduler == "slurm" else _render_pbs(spec, source)


# ---- the scaling sweep -----------------------------------------------------------------------------------------
def render_sweep(family: str, gpu_counts: tuple[int, ...], report_script: str, source: str = "") -> str:
    """A login-node script: one `family` job per GPU count, then the report job once all of them have ended."""
    counts = " ".join(str(g) for g in gpu_counts)
    lines = [
        "#!/bin/bash",
        f"# scaling_sweep: the {family} job at {counts} GPUs, one job each, then the Dice scaling report",
        "# (python -m jobs.scaling_report) as a job that starts when all of them have ended.",
        "#",
        "# Run it from the repository root on a login node (it calls sbatch; it is not a job itself):",
        "#     bash slurm/scaling_sweep.sh [extra trainer flags, e.g. --epochs 20]",
        '#     GPUS="1 2 4 8" bash slurm/scaling_sweep.sh        # some of the GPU counts',
        '#     REPORT_ARGS="--predict a100_ib" bash slurm/scaling_sweep.sh',
        *_wrap_comment(
            f"Rendered by `python -m slurm` from {source or 'a job spec'}: change the spec and render again "
            "rather than editing this file (golden-file tests compare the two)."
        ),
        "set -euo pipefail",
        "if [[ ! -d jobs ]]; then",
        '    echo "scaling_sweep: run from the repository root (no jobs/ in $PWD)" >&2',
        "    exit 1",
        "fi",
        f"GPUS=${{GPUS:-{counts}}}",
        "# Each job keys its run folder by its own id; a RUN_DIR left in this shell would send them all to one.",
        "unset RUN_DIR",
        "out=runs/scaling_$(date +%Y%m%d_%H%M%S)",
        "ids=()",
        "dirs=()",
        "for g in $GPUS; do",
        f"    script=slurm/{family}_${{g}}gpu.sh",
        "    if [[ ! -f $script ]]; then",
        '        echo "scaling_sweep: no $script; render it with" \\',
        f'            "python -m slurm --job {family} --gpus $g -o $script" >&2',
        "        exit 1",
        "    fi",
        '    # --parsable prints "id" or "id;cluster".',
        '    id=$(sbatch --parsable "$script" "$@")',
        "    id=${id%%;*}",
        '    ids+=("$id")',
        f'    dirs+=("runs/{family}_${{g}}gpu_$id")',
        f'    echo "{family} $g GPU(s): job $id, run folder runs/{family}_${{g}}gpu_$id"',
        "done",
        "# afterany: the report runs whatever became of the jobs, and reports the run folders it can read.",
        'dep=afterany:$(IFS=:; echo "${ids[*]}")',
        "# shellcheck disable=SC2086 # REPORT_ARGS holds several flags",
        f'report=$(sbatch --parsable --dependency="$dep" {report_script} \\',
        '    "${dirs[@]}" --out "$out" ${REPORT_ARGS:-})',
        'echo "scaling report: job ${report%%;*}, after jobs ${ids[*]}; output in $out"',
        "",
    ]
    return "\n".join(lines)
