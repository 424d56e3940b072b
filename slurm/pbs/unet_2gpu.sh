#!/bin/bash
# unet_2gpu: 3D U-Net lung-nodule segmentation.
# 2 GPUs on 1 node x 2, one Horovod rank per GPU; launched with mpirun.
#
# Submit from the repository root:  qsub [-v TRAIN_ARGS="extra flags"] slurm/pbs/unet_2gpu.sh
# Continue an earlier run folder:   qsub -v RUN_DIR=<run folder> slurm/pbs/unet_2gpu.sh
# Rendered by `python -m slurm` from slurm/catalog.py and slurm/specs/site.yaml: change the spec and render
# again rather than editing this file (golden-file tests compare the two).

# ---- resources ---------------------------------------------------------------------------------------------
#PBS -N unet_2gpu
# 1 node (chunks) x 2 ranks; ncpus = ranks x 8 CPUs, mpiprocs = ranks per node, mem per node. Torque instead:
# -l nodes=1:ppn=16:gpus=2.
#PBS -l select=1:ncpus=16:ngpus=2:mpiprocs=2:mem=128gb
#PBS -l walltime=24:00:00
# No queue set: the server's default queue (set `queue` in slurm/specs/site.yaml).
# Charged account: uncomment, or set `account` in slurm/specs/site.yaml.
##PBS -A ACCOUNT
# One log for stdout and stderr, in the submission folder.
#PBS -j oe
# ---- preemption and requeue --------------------------------------------------------------------------------
# Rerunnable: the server reruns the job (same id, same run folder) after a node failure, and this script
# reruns it after a preemption checkpoint. PBS has no warning signal before the walltime; a timer in the
# script sends USR1 instead.
#PBS -r y

# PBS starts the job in $HOME: go back to where it was submitted (the repository root).
cd "${PBS_O_WORKDIR:-.}"

# ---- site set-up: modules, conda or venv (slurm/specs/site.yaml) -------------------------------------------
# Before `set -u`: module and conda scripts often read unset variables. Horovod must find the same MPI and
# CUDA at run time as at build time.
# module load cuda/12.4 openmpi/4.1.6     # the CUDA and MPI that Horovod was built against
# source "$HOME/miniforge3/etc/profile.d/conda.sh" && conda activate hvdtrain
if [[ -f .venv/bin/activate ]]; then source .venv/bin/activate; fi

set -euo pipefail
if [[ ! -d jobs ]]; then
    echo "unet_2gpu: submit from the repository root (no jobs/ in $PWD)" >&2
    exit 1
fi
# 1234.server -> 1234
JOB_ID=${PBS_JOBID%%.*}

# ---- environment -------------------------------------------------------------------------------------------
# One OpenMP/intra-op thread per CPU given to each rank.
export OMP_NUM_THREADS=8
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

# ---- run folder --------------------------------------------------------------------------------------------
# One per job id: a requeued job keeps its id, comes back to the same folder and resumes there.
RUN_DIR=${RUN_DIR:-runs/unet_2gpu_${JOB_ID}}
export RUN_DIR
mkdir -p "$RUN_DIR"

echo "$(date -Is) job $PBS_JOBID on $(sort -u "$PBS_NODEFILE" | paste -sd, -), run folder $RUN_DIR"

# ---- launch ------------------------------------------------------------------------------------------------
# qsub passes no arguments to a script: TRAIN_ARGS (qsub -v) adds flags to the command.
# One line per node with 2 slots: $PBS_NODEFILE repeats a host once per
# mpiprocs (PBS Pro) or once per CPU (Torque ppn); horovodrun takes only `host slots=N` lines.
hostfile="$RUN_DIR/hostfile_$JOB_ID"
sort -u "$PBS_NODEFILE" | sed 's/$/ slots=2/' >"$hostfile"
# mpirun passes on only the variables named with -x (and warns about unset ones): collect the set ones.
xvars=()
for v in PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS NCCL_DEBUG NCCL_SOCKET_IFNAME \
    HOROVOD_FUSION_THRESHOLD HOROVOD_CYCLE_TIME HOROVOD_STALL_CHECK_TIME_SECONDS \
    HOROVOD_STALL_SHUTDOWN_TIME_SECONDS PYTHONUNBUFFERED; do
    if [[ -v $v ]]; then xvars+=(-x "$v"); fi
done
# -bind-to none: each rank uses its CPUs freely; -map-by slot: consecutive ranks fill a node first.
# ob1/^openib: MPI's own traffic over TCP (NCCL still uses InfiniBand/RoCE for the gradients).
mpirun -np 2 --hostfile "$hostfile" -bind-to none -map-by slot \
    -mca pml ob1 -mca btl ^openib "${xvars[@]}" \
    python -m jobs.train_unet --config jobs/configs/unet_lung.yaml --run-dir "$RUN_DIR" --resume ${TRAIN_ARGS:-} &
launcher=$!
forward() { kill -s "$1" "$launcher" 2>/dev/null || true; }
# PBS sends no warning before the walltime: send USR1 ourselves 300 s before it.
# Torque exports the real walltime as PBS_WALLTIME; PBS Pro does not, so the rendered one is the default.
warn_after=$(( ${PBS_WALLTIME:-86400} - 300 ))
# The timer's own sleep ends with it (a stray sleep would hold the job's output open).
{
    trap 'kill $! 2>/dev/null; exit 0' TERM
    sleep "$(( warn_after > 0 ? warn_after : 0 ))" &
    wait "$!" && forward USR1
} >/dev/null 2>&1 &
timer=$!
# A USR1 sent to this shell (e.g. qsig -s USR1 <job>) goes on to the ranks.
trap 'forward USR1' USR1
# TERM (qdel, walltime) reaches the ranks from the scheduler itself; this shell only waits for them.
trap 'echo "$(date -Is) TERM: waiting for the ranks to checkpoint"' TERM
rc=0
wait "$launcher" || rc=$?
# A trapped signal ends `wait` early; wait again until the launcher itself has exited.
while kill -0 "$launcher" 2>/dev/null; do rc=0; wait "$launcher" || rc=$?; done
kill "$timer" 2>/dev/null || true

# ---- requeue after a hung rank -----------------------------------------------------------------------------
# The trainer's watchdog (--stall-timeout) ended a rank that waited too long for another one with exit 75
# and left $RUN_DIR/STALLED; the launcher ended the other ranks. Requeue as after a node failure: the job
# resumes from the newest checkpoint.
if [[ ( $rc -eq 75 || -f $RUN_DIR/STALLED ) ]]; then
    echo "$(date -Is) a rank hung (exit $rc): $(cat "$RUN_DIR/STALLED" 2>/dev/null | head -c 400)"
    rm -f "$RUN_DIR/STALLED"
    touch "$RUN_DIR/REQUEUE"
    rc=0
fi

# ---- requeue after a preemption checkpoint -----------------------------------------------------------------
# The trainer left $RUN_DIR/REQUEUE: it was signalled, saved checkpoints/last.pt and stopped early.
# qrerun puts this job back in the queue with the same id (so the same run folder), but many sites
# allow it to operators only; then submit a new job that continues in this run folder.
if [[ $rc -eq 0 && -f $RUN_DIR/REQUEUE ]]; then
    rm -f "$RUN_DIR/REQUEUE"
    echo "$(date -Is) preempted: rerunning job $PBS_JOBID"
    if ! qrerun "$PBS_JOBID"; then
        if [[ -n ${TRAIN_ARGS:-} ]]; then
            qsub -v RUN_DIR="$RUN_DIR",TRAIN_ARGS="$TRAIN_ARGS" slurm/pbs/unet_2gpu.sh
        else
            qsub -v RUN_DIR="$RUN_DIR" slurm/pbs/unet_2gpu.sh
        fi
    fi
fi
exit "$rc"
