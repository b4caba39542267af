#!/usr/bin/env bash
# All recipes of one model, one after another, with identical data, seed, batch and schedule:
#
#   examples/pretrain/sweep.sh MODEL [extra pretrain flags...]     (RECIPES="bf16 averis" to pick)
#
# Each run logs under runs/MODEL-RECIPE; wandb groups them by model (see docs/training.md).
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,6p' "$0" >&2; exit 2; fi
MODEL=$1
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for RECIPE in ${RECIPES:-bf16 nvfp4-plain nvfp4-nohadamard nvfp4 averis averis-rht}; do
    echo "=== $MODEL $RECIPE"
    "$HERE/train.sh" "$MODEL" "$RECIPE" "$@"
done
