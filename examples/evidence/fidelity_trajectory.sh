#!/usr/bin/env bash
# Gradient fidelity along a training trajectory (docs/results.md): train MODEL in BF16 with the
# Averis paper's schedule shape, checkpoint every SAVE_INTERVAL steps, then measure at every
# checkpoint how far each FP4 recipe's full-model gradient is from the BF16 gradient of the same
# weights and tokens, and the mean-bias statistics of the operands.
#
#   examples/evidence/fidelity_trajectory.sh [MODEL]      (default qwen3-0.6b)
#
# Environment: the schedule below, RECIPES, FIDELITY_BATCH, OUT_DIR (runs), RESULT (output prefix).
set -euo pipefail
MODEL=${1:-qwen3-0.6b}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The paper's optimizer (peak LR 1e-4, AdamW β 0.9/0.95, weight decay 0.01, no clipping) and a
# warm-up that is long relative to the run (a third), cosine to a tenth.
export TRAIN_ITERS=${TRAIN_ITERS:-400} WARMUP=${WARMUP:-130} LR=${LR:-1e-4} MIN_LR=${MIN_LR:-1e-5}
export SEQ_LENGTH=${SEQ_LENGTH:-2048} MICRO_BATCH=${MICRO_BATCH:-8} GLOBAL_BATCH=${GLOBAL_BATCH:-16}
export SAVE_INTERVAL=${SAVE_INTERVAL:-80} EVAL_INTERVAL=${EVAL_INTERVAL:-80} EVAL_ITERS=${EVAL_ITERS:-2}
export LOG_INTERVAL=1 DIST_OPT=${DIST_OPT:-0} NPROC_PER_NODE=${NPROC_PER_NODE:-1}
export OUT_DIR=${OUT_DIR:-runs} RUN_NAME=${RUN_NAME:-$MODEL-bf16-trajectory}
RECIPES=${RECIPES:-bf16 nvfp4-plain nvfp4-nohadamard nvfp4 averis averis-rht averis-paper}
RESULT=${RESULT:-$OUT_DIR/$RUN_NAME-fidelity}

examples/pretrain/train.sh "$MODEL" bf16 --weight-decay 0.01 --clip-grad 0 --wandb-mode disabled
# shellcheck disable=SC2086  # RECIPES is a word list
python3 tools/gradient_fidelity.py --load "$OUT_DIR/$RUN_NAME" --steps all --recipes $RECIPES \
    --reference bf16 --batch-size "${FIDELITY_BATCH:-4}" --operand-recipes bf16 \
    --out "$RESULT" --plot
