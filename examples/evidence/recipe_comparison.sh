#!/usr/bin/env bash
# Recipe comparison over seeds (docs/results.md): every recipe x seed trained from scratch with the
# same data, schedule and (per seed) initialisation, several runs per GPU.
#
#   examples/evidence/recipe_comparison.sh pick  MODEL...   BF16 seed-1 runs of each candidate, their
#                                                           mean-bias analysis, prints the chosen model
#   examples/evidence/recipe_comparison.sh run   MODEL      every recipe x seed (skips finished runs)
#   examples/evidence/recipe_comparison.sh summarize MODEL  table over seeds + paired comparisons
#
# Environment: RECIPES, SEEDS, GPUS ("0 1"), PER_GPU, DEADLINE_MIN, STUDY_DIR (runs/study), and
# the protocol below (TRAIN_ITERS, GLOBAL_BATCH, ...), which every run of a study must share.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,13p' "$0" >&2; exit 2; fi
CMD=$1
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

RECIPES=${RECIPES:-bf16 nvfp4-plain nvfp4-nohadamard nvfp4 averis averis-rht averis-paper}
SEEDS=${SEEDS:-1 2 3}
GPUS=${GPUS:-0}
PER_GPU=${PER_GPU:-3}  # three qwen3-25m runs at micro-batch 32 kept one H200 busy (65 GiB)
DEADLINE_MIN=${DEADLINE_MIN:-1000000}
STUDY_DIR=${STUDY_DIR:-runs/study}

# The protocol: the Averis paper's optimizer (AdamW β 0.9/0.95, weight decay 0.01, no gradient
# clipping, long warm-up, cosine) with the peak LR scaled from its 1e-4 at hidden size 1024 by
# 1024/hidden (set LR to override); loss logged every step; bit-reproducible kernels.
export TRAIN_ITERS=${TRAIN_ITERS:-500} WARMUP=${WARMUP:-50}
export SEQ_LENGTH=${SEQ_LENGTH:-1024} GLOBAL_BATCH=${GLOBAL_BATCH:-64} MICRO_BATCH=${MICRO_BATCH:-32}
export EVAL_INTERVAL=${EVAL_INTERVAL:-100} EVAL_ITERS=${EVAL_ITERS:-8} LOG_INTERVAL=${LOG_INTERVAL:-1}
export SAVE_INTERVAL=${SAVE_INTERVAL:-$TRAIN_ITERS} DIST_OPT=${DIST_OPT:-0} DETERMINISTIC=${DETERMINISTIC:-1}
export OUT_DIR=$STUDY_DIR
# Eager steps with RoPE and cross entropy unfused, as in the runs under results/ (2026-12-01), so
# that seeds added later share their numerics (CUDA_GRAPH=auto is faster; its replay matches
# eager steps to 1e-6, not bit for bit).
export CUDA_GRAPH=${CUDA_GRAPH:-none}
EXTRA=(--weight-decay 0.01 --clip-grad 0 --adam-beta1 0.9 --adam-beta2 0.95 --wandb-mode disabled
       --no-rope-fusion --no-cross-entropy-loss-fusion)

lr_for() {  # peak LR of MODEL: 1e-4 x 1024 / hidden, unless LR is set
    if [ -n "${LR:-}" ]; then echo "$LR"; return; fi
    python3 -c "from megatron_averis.training.presets import get_preset as g; print(f'{1e-4 * 1024 / g(\"$1\").arch.hidden_size:.3g}')"
}

launch() {  # "MODEL..." "RECIPE...": one launcher per model (each has its own LR), concurrently
    local models=$1 recipes=$2 model lr port=29600 rc=0
    local -a pids=()
    for model in $models; do
        lr=$(lr_for "$model")
        # shellcheck disable=SC2086  # word lists
        LR=$lr MIN_LR=$(python3 -c "print(f'{$lr / 10:.3g}')") python3 tools/recipe_study.py launch \
            --model "$model" --recipes $recipes --seeds $SEEDS --gpus $GPUS --per-gpu "$PER_GPU" \
            --out-dir "$STUDY_DIR" --deadline-min "$DEADLINE_MIN" --port-base "$port" -- "${EXTRA[@]}" &
        pids+=($!)
        port=$((port + 1000))
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
    return "$rc"
}

case "$CMD" in
    pick)
        SEEDS=1 launch "$*" bf16
        args=()
        for model in "$@"; do
            python3 tools/analyze_mean_bias.py --load "$STUDY_DIR/$model-bf16-s1" --grads \
                --batch-size 8 --out "$STUDY_DIR/meanbias-$model" >/dev/null
            args+=("$model=$STUDY_DIR/meanbias-$model.csv")
        done
        python3 tools/recipe_study.py pick-model "${args[@]}" --out "$STUDY_DIR/pick.json" ;;
    run)
        launch "$1" "$RECIPES" ;;
    summarize)
        python3 tools/recipe_study.py summarize "$STUDY_DIR" --baseline bf16 \
            --pairs averis:nvfp4-nohadamard averis-rht:nvfp4 averis-paper:nvfp4-plain averis:averis-paper \
            --out "${SUMMARY_OUT:-$STUDY_DIR/summary}" ;;
    *) echo "unknown command '$CMD': pick, run or summarize" >&2; exit 2 ;;
esac
