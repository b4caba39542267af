#!/usr/bin/env bash
# Train the tiny model on the embedded public-domain corpus (CPU or one GPU, no network):
#
#   examples/pretrain/quickstart.sh [RECIPE] [extra pretrain flags...]
#
# RECIPE defaults to bf16 with a GPU and fp32 without (CPUs are slow at BF16 arithmetic).
# Builds the corpus and its tokenizer once (data/cache/embedded), then trains 200 steps with
# validation and checkpoints under runs/quickstart-RECIPE. Run it again to see it resume (and
# stop at once, the run being complete); pass e.g. --train-iters 400 to continue further.
set -euo pipefail
if nvidia-smi -L >/dev/null 2>&1; then default_recipe=bf16; else default_recipe=fp32; fi
RECIPE=${1:-$default_recipe}
[ $# -gt 0 ] && shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."
paths=$(python3 tools/prepare_embedded_corpus.py --out-dir data/cache/embedded)
field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1" <<< "$paths"; }
DATA_DIR=$(field dir) TOKENIZER_MODEL=$(field tokenizer_model) RUN_NAME=quickstart-$RECIPE \
    EVAL_INTERVAL=${EVAL_INTERVAL:-50} EVAL_ITERS=${EVAL_ITERS:-4} SAVE_INTERVAL=${SAVE_INTERVAL:-100} \
    NPROC_PER_NODE=${NPROC_PER_NODE:-1} DIST_OPT=0 \
    exec "$HERE/train.sh" tiny "$RECIPE" "$@"
