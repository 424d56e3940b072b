#!/bin/bash
# scaling_report: Dice scaling report over run folders (submitted by slurm/scaling_sweep.sh).
# 1 CPU rank on one node, no GPU; one process.
#
# Submit from the repository root:  sbatch slurm/scaling_report.sh [extra flags for the command]
# Rendered by `python -m slurm` from slurm/catalog.py and slurm/specs/site.yaml: change the spec and render
# again rather than editing this file (golden-file tests compare the two).

# ---- resources ---------------------------------------------------------------------------------------------
#SBATCH --job-name=scaling_report
# CPU job: 1 rank on one node, no GPU.
#SBATCH --nodes=1
#SBATCH --ntasks=1
# CPUs per rank: data-loading workers and intra-op threads.
#SBATCH --cpus-per-task=2
# Memory per node.
#SBATCH --mem=16G
#SBATCH --time=01:00:00
# No partition set: the cluster's default partition (set one in slurm/specs/site.yaml).
# Charged account: uncomment, or set `account` in slurm/specs/site.yaml.
##SBATCH --account=ACCOUNT
# Log in the submission folder (%x job name, %j job id, %A_%a array job and task).
#SBATCH --output=%x_%j.out
#SBATCH --no-requeue

# ---- site set-up: modules, conda or venv (slurm/specs/site.yaml) -------------------------------------------
# Before `set -u`: module and conda scripts often read unset variables. Horovod must find the same MPI and
# CUDA at run time as at build time.
# module load cuda/12.4 openmpi/4.1.6     # the CUDA and MPI that Horovod was built against
# source "$HOME/miniforge3/etc/profile.d/conda.sh" && conda activate hvdtrain
if [[ -f .venv/bin/activate ]]; then source .venv/bin/activate; fi

set -euo pipefail
if [[ ! -d jobs ]]; then
    echo "scaling_report: submit from the repository root (no jobs/ in $PWD)" >&2
    exit 1
fi

# ---- environment -------------------------------------------------------------------------------------------
# One OpenMP/intra-op thread per CPU given to each rank.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-2}
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

echo "$(date -Is) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"

# ---- launch ------------------------------------------------------------------------------------------------
# One process: no MPI launcher.
python -m jobs.scaling_report "$@" &
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
exit "$rc"
