#!/usr/bin/env bash
# Container entry point of megatron-averis. `entrypoint.sh help` prints the usage.
set -euo pipefail

AVERIS_HOME="${AVERIS_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-python3}"

usage() {
  cat <<'USAGE'
Usage: entrypoint.sh COMMAND [ARGS...]

Commands
  pretrain ARGS...   python -m megatron_averis.pretrain ARGS..., under torchrun when
                     NPROC_PER_NODE or NNODES asks for more than one process
  tool NAME ARGS...  run tools/NAME.py (e.g. compare_runs, analyze_mean_bias, convert_to_hf,
                     preprocess_data); `tool` alone lists them
  test ARGS...       python -m pytest tests/unit_tests ARGS...
  help               this text
  anything else      executed as given (bash, python3, nvidia-smi, ...)

Environment for pretrain
  NPROC_PER_NODE  processes per node: a number, or gpu (one per visible GPU) (default: gpu)
  NNODES          nodes: N, or MIN:MAX for an elastic job (default: 1)
  MASTER_ADDR     rendezvous host, reachable from every node (required when NNODES is not 1)
  MASTER_PORT     rendezvous port (default: 29500)
  RDZV_ID         job id shared by the nodes of one job (default: megatron-averis)
  MAX_RESTARTS    torchrun restarts of the worker group after a failure (default: 0)
  AVERIS_DRY_RUN  1: print the command instead of running it
USAGE
}

die() {
  echo "entrypoint.sh: $*" >&2
  exit 2
}

run() {
  if [[ "${AVERIS_DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
    exit 0
  fi
  exec "$@"
}

positive_int() {
  [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

pretrain() {
  local nproc="${NPROC_PER_NODE:-gpu}" nnodes="${NNODES:-1}"
  local port="${MASTER_PORT:-29500}" restarts="${MAX_RESTARTS:-0}"
  positive_int "$nproc" || [[ "$nproc" == "gpu" ]] \
    || die "NPROC_PER_NODE=$nproc: use a positive number or gpu"
  [[ "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] \
    || die "NNODES=$nnodes: use a positive number N, or MIN:MAX"
  if ! positive_int "$port" || ((port > 65535)); then
    die "MASTER_PORT=$port: use a port number 1-65535"
  fi
  [[ "$restarts" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$restarts: use a number >= 0"
  if [[ "$nnodes" == "1" && "$nproc" == "1" ]]; then
    run "$PYTHON" -m megatron_averis.pretrain "$@"
  fi
  local rdzv=(--rdzv-backend=c10d)
  if [[ "$nnodes" == "1" ]]; then
    # One node: a rendezvous on this host (a port of its own unless MASTER_PORT is given).
    rdzv=(--standalone)
    if [[ -n "${MASTER_PORT:-}" ]]; then
      rdzv=(--rdzv-backend=c10d "--rdzv-endpoint=localhost:$port")
    fi
  else
    [[ -n "${MASTER_ADDR:-}" ]] \
      || die "NNODES=$nnodes needs MASTER_ADDR: the host name or address of one of the nodes, reachable from all of them"
    rdzv+=("--rdzv-endpoint=$MASTER_ADDR:$port" "--rdzv-id=${RDZV_ID:-megatron-averis}")
  fi
  run "$PYTHON" -m torch.distributed.run "--nnodes=$nnodes" "--nproc-per-node=$nproc" \
    "${rdzv[@]}" "--max-restarts=$restarts" -m megatron_averis.pretrain "$@"
}

list_tools() {
  local f
  for f in "$AVERIS_HOME"/tools/*.py; do
    if [[ -e "$f" ]]; then basename "$f" .py; fi
  done
}

tool() {
  if [[ $# -eq 0 ]]; then
    echo "tools (entrypoint.sh tool NAME ARGS...):"
    list_tools | sed 's/^/  /'
    exit 0
  fi
  local name="${1%.py}"
  shift
  [[ "$name" =~ ^[A-Za-z0-9_]+$ && -f "$AVERIS_HOME/tools/$name.py" ]] \
    || die "unknown tool '$name'; available: $(list_tools | tr '\n' ' ')"
  run "$PYTHON" "$AVERIS_HOME/tools/$name.py" "$@"
}

main() {
  if [[ $# -eq 0 ]]; then
    usage
    exit 0
  fi
  local cmd="$1"
  shift
  case "$cmd" in
    pretrain) pretrain "$@" ;;
    tool) tool "$@" ;;
    test) cd "$AVERIS_HOME" && run "$PYTHON" -m pytest tests/unit_tests "$@" ;;
    help | -h | --help) usage ;;
    -*) die "unknown option '$cmd'; the first argument is a command (see: entrypoint.sh help)" ;;
    *) run "$cmd" "$@" ;;
  esac
}

main "$@"
