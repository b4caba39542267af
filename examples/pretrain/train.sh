#!/usr/bin/env bash
# One node or several, through torchrun.
#
#   examples/pretrain/train.sh MODEL RECIPE [extra pretrain flags...]
#
# One node, all its GPUs:          examples/pretrain/train.sh qwen3-0.6b averis
# TP=2 with sequence parallelism:  TP=2 SP=1 NPROC_PER_NODE=2 examples/pretrain/train.sh qwen3-0.6b averis
# Several nodes: run on every node with the same MASTER_ADDR/MASTER_PORT and NNODES, and that
# node's NODE_RANK (0 .. NNODES-1):
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 examples/pretrain/train.sh llama-1b nvfp4   # node0
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 examples/pretrain/train.sh llama-1b nvfp4   # node1
# Configuration and environment overrides: config.sh. Runs resume from their latest checkpoint.
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,14p' "$0" >&2
    exit 2
fi
MODEL=$1 RECIPE=$2
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."   # repository root: relative data and output paths start here
# shellcheck source-path=SCRIPTDIR source=config.sh
source "$HERE/config.sh"
pretrain_args "$MODEL" "$RECIPE"

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l)
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
exec torchrun \
    --nproc-per-node "$NPROC_PER_NODE" \
    --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m megatron_averis.pretrain "${PRETRAIN_ARGS[@]}" "$@"
