#!/bin/bash
# tune_array: Optuna study of the U-Net, 8 single-GPU workers as a job array.
# 1 GPU on 1 node x 1, one Horovod rank per GPU; launched with srun.
#
# Submit from the repository root:  sbatch slurm/tune_array.sh [extra flags for the command]
# Rendered by `python -m slurm` from slurm/catalog.py and slurm/specs/site.yaml: change the spec and render
# again rather than editing this file (golden-file tests compare the two).

# ---- resources ---------------------------------------------------------------------------------------------
#SBATCH --job-name=tune_array
# 1 GPU = 1 node x 1, one rank per GPU.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
# Every rank sees all of its node's GPUs and takes cuda:<local rank>; no per-rank CUDA_VISIBLE_DEVICES
# (--gpus-per-task, --gpu-bind), which would disable CUDA IPC between the ranks.
#SBATCH --gres=gpu:1
# CPUs per rank: data-loading workers and intra-op threads.
#SBATCH --cpus-per-task=8
# Memory per node.
#SBATCH --mem=64G
#SBATCH --time=24:00:00
# No partition set: the cluster's default partition (set one in slurm/specs/site.yaml).
# Charged account: uncomment, or set `account` in slurm/specs/site.yaml.
##SBATCH --account=ACCOUNT
# One array task per index, each an independent job with the same script.
#SBATCH --array=0-7
# Log in the submission folder (%x job name, %j job id, %A_%a array job and task), appended to across
# requeues.
#SBATCH --output=%x_%A_%a.out
#SBATCH --open-mode=append
# ---- preemption and requeue --------------------------------------------------------------------------------
# The job may go back to the queue: Slurm requeues it after a node failure and it starts again.
#SBATCH --requeue

# ---- site set-up: modules, conda or venv (slurm/specs/site.yaml) -------------------------------------------
# Before `set -u`: module and conda scripts often read unset variables. Horovod must find the same MPI and
# CUDA at run time as at build time.
# module load cuda/12.4 openmpi/4.1.6     # the CUDA and MPI that Horovod was built against
# source "$HOME/miniforge3/etc/profile.d/conda.sh" && conda activate hvdtrain
if [[ -f .venv/bin/activate ]]; then source .venv/bin/activate; fi

set -euo pipefail
if [[ ! -d jobs ]]; then
    echo "tune_array: submit from the repository root (no jobs/ in $PWD)" >&2
    exit 1
fi

# ---- environment -------------------------------------------------------------------------------------------
# One OpenMP/intra-op thread per CPU given to each rank.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
# NCCL warnings only; INFO once shows the transport it chose (IB, RoCE or sockets).
export NCCL_DEBUG=WARN
# Pin NCCL's socket traffic to one interface when it picks a wrong one ('^docker0,lo' excludes).
# export NCCL_SOCKET_IFNAME=ib0
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

# ---- job variables -----------------------------------------------------------------------------------------
# Every array task is one worker of the same study (trials are shared through the storage).
STUDY=${STUDY:-unet_lung}
# A journal file on a shared file system, or an RDB URL such as postgresql://user@host/optuna (better
# with many nodes: journal-file locks over NFS are fragile).
STORAGE=${STORAGE:-runs/tune/unet_lung.journal}
if [[ $STORAGE != *://* ]]; then mkdir -p "$(dirname "$STORAGE")"; fi
export STUDY STORAGE

echo "$(date -Is) job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"

# ---- launch ------------------------------------------------------------------------------------------------
# srun starts the ranks; Horovod's MPI learns ranks and hosts from Slurm's PMIx (`srun --mpi=list`
# shows what the site has: pmix, pmix_v4 or pmi2). --cpus-per-task again: srun 22.05 to 23.02 does
# not take it from sbatch and would pin each rank to one CPU. --kill-on-bad-exit: one failed rank ends
# the step instead of leaving the others waiting in an allreduce.
srun --mpi=pmix --ntasks="$SLURM_NTASKS" --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \
    python -m jobs.tune --task unet --config jobs/configs/unet_lung.yaml --trials 4 --max-trials 32 --study "$STUDY" --storage "$STORAGE" "$@" &
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
