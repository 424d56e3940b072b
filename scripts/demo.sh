#!/usr/bin/env bash
# `make demo`: phantom chest CT -> 2-rank Horovod U-Net on the CPU -> predicted NIfTI masks, with the verdict.
#   NP=2 RUN_DIR=runs/unet_demo-<time> DATA=data/phantoms_demo bash scripts/demo.sh [extra train_unet flags]
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
DATA=${DATA:-data/phantoms_demo}
RUN_DIR=${RUN_DIR:-runs/unet_demo-$(date +%Y%m%d-%H%M%S)}  # a new folder each time: no run is overwritten
BAR=0.80

if [[ ! -f "$DATA/dataset.json" ]]; then
    echo "demo: writing the phantom dataset to $DATA (24 training, 8 validation, 2 test volumes)"
    python -m jobs.make_phantoms "$DATA" --preset demo
fi
start=$(date +%s)
# jobs._launch: horovodrun with the measured launch settings (MPI over shared memory; see jobs/_launch.py).
python -m jobs._launch -np "$NP" python -m jobs.train_unet --config jobs/configs/unet_demo.yaml \
    --data "$DATA" --run-dir "$RUN_DIR" "$@"
python -m jobs.predict --checkpoint "$RUN_DIR/checkpoints/best.pt" "$DATA" --split test --out "$RUN_DIR/masks"
python - "$RUN_DIR" "$BAR" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
run, bar, secs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
s = json.load(open(f"{run}/summary.json"))
best = s["best_metric"]
verdict = "met" if best is not None and best >= bar else "NOT met"
print(f"\ndemo: best validation Dice {best:.3f} at epoch {s['best_epoch']} on {s['world_size']} ranks "
      f"in {secs // 60} min {secs % 60} s (bar: Dice >= {bar} within 15 min: {verdict})")
print(f"demo: run folder {run} (metrics.jsonl, per_case_dice.csv, checkpoints/); masks in {run}/masks/")
PY
