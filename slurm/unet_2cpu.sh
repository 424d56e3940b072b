#!/bin/bash
# unet_2cpu: 3D U-Net on CPUs with the demo preset (phantom CT; make them with jobs.make_phantoms).
# 2 CPU ranks on one node, no GPU; launched with srun.
#
# Submit from the repository root:  sbatch slurm/unet_2cpu.sh [extra flags for the command]
# Continue an earlier run folder:   sbatch --export=ALL,RUN_DIR=<run folder> slurm/unet_2cpu.sh
# Rendered by `python -m slurm` from slurm/catalog.py and slurm/specs/site.yaml: change the spec and render
# again rather than editing this file (golden-file tests compare the two).

# ---- resources ---------------------------------------------------------------------------------------------
#SBATCH --job-name=unet_2cpu
# CPU job: 2 ranks on one node, no GPU.
#SBATCH --nodes=1
#SBATCH --ntasks=2
# CPUs per rank: data-loading workers and intra-op threads.
#SBATCH --cpus-per-task=1
# Memory per node.
#SBATCH --mem=8G
#SBATCH --time=02:00:00
# No partition set: the cluster's default partition (set one in slurm/specs/site.yaml).
# Charged account: uncomment, or set `account` in slurm/specs/site.yaml.
##SBATCH --account=ACCOUNT
# Log in the submission folder (%x job name, %j job id, %A_%a array job and task), appended to across
# requeues.
#SBATCH --output=%x_%j.out
#SBATCH --open-mode=append
# ---- preemption and requeue --------------------------------------------------------------------------------
# USR1 goes to every rank (the job step's tasks) 120 s before the time limit: the trainer checkpoints, writes
# $RUN_DIR/REQUEUE and exits 0; this script then requeues the job.
#SBATCH --signal=USR1@120
# The job may go back to the queue: requeued by this script after a preemption checkpoint, by Slurm after a
# node failure; either way it restarts with the same job id and resumes.
#SBATCH --requeue

# ---- site set-up: modules, conda or venv (slurm/specs/site.yaml) -------------------------------------------
# Before `set -u`: module and conda scripts often read unset variables. Horovod must find the same MPI and
# CUDA at run time as at build time.
# module load cuda/12.4 openmpi/4.1.6     # the CUDA and MPI that Horovod was built against
# source "$HOME/miniforge3/etc/profile.d/conda.sh" && conda activate hvdtrain
if [[ -f .venv/bin/activate ]]; then source .venv/bin/activate; fi

set -euo pipefail
if [[ ! -d jobs ]]; then
    echo "unet_2cpu: submit from the repository root (no jobs/ in $PWD)" >&2
    exit 1
fi

# ---- environment -------------------------------------------------------------------------------------------
# One OpenMP/intra-op thread per CPU given to each rank.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# Gradients ready together go in one allreduce of up to 128 MiB (Horovod's default; 0 turns fusion off).
export HOROVOD_FUSION_THRESHOLD=134217728
# Milliseconds Horovod waits to gather ready tensors for one fusion (default 1); a few ms batch more on a slow
# network.
export HOROVOD_CYCLE_TIME=1
# Warn when ranks wait this long for each other on a tensor (uneven batches, a rank-only branch).
export HOROVOD_STALL_CHECK_TIME_SECONDS=60
# End the job rather than hang until the time limit when such a stall lasts this long.
export HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=600
# Log lines appear when printed, not when a buffer fills.
export PYTHONUNBUFFERED=1

# ---- run folder --------------------------------------------------------------------------------------------
# One per job id: a requeued job keeps its id, comes back to the same folder and resumes there.
RUN_DIR=${RUN_DIR:-runs/unet_2cpu_${SLURM_JOB_ID}}
export RUN_DIR
mkdir -p "$RUN_DIR"

echo "$(date -Is) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, run folder $RUN_DIR"

# ---- launch ------------------------------------------------------------------------------------------------
# srun starts the ranks; Horovod's MPI learns ranks and hosts from Slurm's PMIx (`srun --mpi=list`
# shows what the site has: pmix, pmix_v4 or pmi2). --cpus-per-task again: srun 22.05 to 23.02 does
# not take it from sbatch and would pin each rank to one CPU. --kill-on-bad-exit: one failed rank ends
# the step instead of leaving the others waiting in an allreduce.
srun --mpi=pmix --ntasks="$SLURM_NTASKS" --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \
    python -m jobs.train_unet --config jobs/configs/unet_demo.yaml --run-dir "$RUN_DIR" --resume "$@" &
launcher=$!
forward() { kill -s "$1" "$launcher" 2>/dev/null || true; }
# A USR1 sent to this shell (e.g. scancel --batch --signal=USR1 <job>) goes on to the ranks.
trap 'forward USR1' USR1
# TERM (scancel, time limit) reaches the ranks from the scheduler itself; this shell only waits for them.
trap 'echo "$(date -Is) TERM: waiting for the ranks to checkpoint"' TERM
rc=0
wait "$launcher" || rc=$?
# A trapped signal ends `wait` early; wait again until the launcher itself has exited.
while kill -0 "$launcher" 2>/dev/null; do rc=0; wait "$launcher" || rc=$?; done

# ---- requeue after a hung rank -----------------------------------------------------------------------------
# The trainer's watchdog (--stall-timeout) ended a rank that waited too long for another one with exit 75
# and left $RUN_DIR/STALLED; the launcher ended the other ranks. Requeue as after a node failure: the job
# resumes from the newest checkpoint (at most 5 restarts, so a hang that always comes back stops).
if [[ ( $rc -eq 75 || -f $RUN_DIR/STALLED ) && ${SLURM_RESTART_COUNT:-0} -lt 5 ]]; then
    echo "$(date -Is) a rank hung (exit $rc): $(cat "$RUN_DIR/STALLED" 2>/dev/null | head -c 400)"
    rm -f "$RUN_DIR/STALLED"
    touch "$RUN_DIR/REQUEUE"
    rc=0
fi

# ---- requeue after a preemption checkpoint -----------------------------------------------------------------
# The trainer left $RUN_DIR/REQUEUE: it was signalled, saved checkpoints/last.pt and stopped early.
# Requeue this job (same id, same run folder; the command always has --resume). A requeue refused
# (job cancelled, time limit already reached) leaves the checkpoint for a manual resubmission.
if [[ $rc -eq 0 && -f $RUN_DIR/REQUEUE ]]; then
    rm -f "$RUN_DIR/REQUEUE"
    echo "$(date -Is) preempted: requeueing job ${SLURM_JOB_ID}"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "requeue refused: continue with  sbatch --export=ALL,RUN_DIR=$RUN_DIR slurm/unet_2cpu.sh" >&2
        exit 1
    fi
fi
exit "$rc"
