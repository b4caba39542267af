#!/usr/bin/env bash
# The same training run under TP=1, TP=2 + SP, PP=2 and DP=2 (docs/parallelism.md): per-step
# losses against TP=1, per recipe. Needs 2 GPUs (or DISTRIBUTED_BACKEND=gloo on CPU).
#
#   examples/evidence/parallel_equivalence.sh [MODEL]        (default tiny; RECIPES="averis nvfp4")
#
# Writes $OUT_DIR/equivalence-RECIPE.md (and .png). Same seed, data and schedule for every layout;
# deterministic kernels; no distributed optimizer, so DP=2 changes only the reduction.
set -euo pipefail
MODEL=${1:-tiny}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."
export OUT_DIR=${OUT_DIR:-runs/equivalence}
export TRAIN_ITERS=${TRAIN_ITERS:-20} LOG_INTERVAL=1 EVAL_ITERS=${EVAL_ITERS:-1} EVAL_INTERVAL=${EVAL_INTERVAL:-20}
export SAVE_INTERVAL=${SAVE_INTERVAL:-100000} GLOBAL_BATCH=${GLOBAL_BATCH:-8} MICRO_BATCH=${MICRO_BATCH:-4}
export DIST_OPT=0 DETERMINISTIC=1
extra=(--wandb-mode disabled)
if [ -n "${DISTRIBUTED_BACKEND:-}" ]; then extra+=(--distributed-backend "$DISTRIBUTED_BACKEND"); fi
for RECIPE in ${RECIPES:-averis nvfp4}; do
    runs=()
    # layout name, TP, PP, SP, processes
    for layout in "tp1 1 1 0 1" "tp2sp 2 1 1 2" "pp2 1 2 0 2" "dp2 1 1 0 2"; do
        read -r name tp pp sp nproc <<< "$layout"
        run=$MODEL-$RECIPE-$name
        rm -rf "${OUT_DIR:?}/$run"
        echo "=== $run"
        RUN_NAME=$run TP=$tp PP=$pp SP=$sp NPROC_PER_NODE=$nproc \
            examples/pretrain/train.sh "$MODEL" "$RECIPE" "${extra[@]}" > "$OUT_DIR-$run.log" 2>&1 \
            || { echo "$run failed: see $OUT_DIR-$run.log" >&2; tail -20 "$OUT_DIR-$run.log" >&2; exit 1; }
        runs+=("$name=$OUT_DIR/$run")
    done
    python3 tools/compare_runs.py "${runs[@]}" --baseline tp1 --last-percent 100 --per-step \
        --out "$OUT_DIR/equivalence-$RECIPE" --title "$MODEL $RECIPE: parallel layouts vs TP=1"
done
