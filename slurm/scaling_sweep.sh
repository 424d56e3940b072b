#!/bin/bash
# scaling_sweep: the unet job at 1 2 4 8 16 32 64 GPUs, one job each, then the Dice scaling report
# (python -m jobs.scaling_report) as a job that starts when all of them have ended.
#
# Run it from the repository root on a login node (it calls sbatch; it is not a job itself):
#     bash slurm/scaling_sweep.sh [extra trainer flags, e.g. --epochs 20]
#     GPUS="1 2 4 8" bash slurm/scaling_sweep.sh        # some of the GPU counts
#     REPORT_ARGS="--predict a100_ib" bash slurm/scaling_sweep.sh
# Rendered by `python -m slurm` from slurm/catalog.py and slurm/specs/site.yaml: change the spec and render
# again rather than editing this file (golden-file tests compare the two).
set -euo pipefail
if [[ ! -d jobs ]]; then
    echo "scaling_sweep: run from the repository root (no jobs/ in $PWD)" >&2
    exit 1
fi
GPUS=${GPUS:-1 2 4 8 16 32 64}
# Each job keys its run folder by its own id; a RUN_DIR left in this shell would send them all to one.
unset RUN_DIR
out=runs/scaling_$(date +%Y%m%d_%H%M%S)
ids=()
dirs=()
for g in $GPUS; do
    script=slurm/unet_${g}gpu.sh
    if [[ ! -f $script ]]; then
        echo "scaling_sweep: no $script; render it with" \
            "python -m slurm --job unet --gpus $g -o $script" >&2
        exit 1
    fi
    # --parsable prints "id" or "id;cluster".
    id=$(sbatch --parsable "$script" "$@")
    id=${id%%;*}
    ids+=("$id")
    dirs+=("runs/unet_${g}gpu_$id")
    echo "unet $g GPU(s): job $id, run folder runs/unet_${g}gpu_$id"
done
# afterany: the report runs whatever became of the jobs, and reports the run folders it can read.
dep=afterany:$(IFS=:; echo "${ids[*]}")
# shellcheck disable=SC2086 # REPORT_ARGS holds several flags
report=$(sbatch --parsable --dependency="$dep" slurm/scaling_report.sh \
    "${dirs[@]}" --out "$out" ${REPORT_ARGS:-})
echo "scaling report: job ${report%%;*}, after jobs ${ids[*]}; output in $out"
