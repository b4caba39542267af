#!/usr/bin/env bash
# The whole performance benchmark of issues 6 and 18 on one GPU, into one report file:
#   bash benchmarks/run_all.sh [REPORT]        (default REPORT: benchmarks-report.md)
# 1. quant_kernels.py: kernel bandwidth against copy, per-GEMM ratios to BF16;
# 2. linear_step.py: one linear's forward+backward per recipe, at the Qwen3-0.6B fc1 and Llama-1B
#    fc1 shapes (docs/performance.md, Commands);
# 3. model_step.py: the whole training step of qwen3-0.6b and llama-1b per recipe, eager and as a
#    CUDA graph (the trainer's --cuda-graph-impl local), with the targets, with Transformer
#    Engine hidden (benchmarks/without_te.py);
# 4. the BF16 step again with Transformer Engine's layers, where TE is installed.
# Standard error goes into the report too, so a failure's traceback is kept with the figures.
set -euo pipefail

report=$(realpath -m "${1:-benchmarks-report.md}")  # relative to where it is run from
cd "$(dirname "$0")/.."
# This checkout, not whatever an installed megatron_averis points at.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
versions=$(python3 - <<'PY'
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{gpu}|torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}")
PY
)
gpu=${gpu:-${versions%%|*}}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown")
# A tree that differs from its commit (local edits, a copied working tree) says so.
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit + local changes"; fi

{
    echo "# megatron-averis benchmarks: $(date -u '+%Y-%m-%d %H:%M UTC') | GPU: ${gpu} | ${versions#*|} | commit ${commit}"
    echo
    echo '## Kernels and GEMMs (benchmarks/quant_kernels.py)'
    echo
    python3 benchmarks/quant_kernels.py
    echo
    echo '## One linear, forward + backward (benchmarks/linear_step.py)'
    echo
    python3 benchmarks/linear_step.py --tokens 8192 --in 1024 --out 3072
    echo
    python3 benchmarks/linear_step.py --tokens 8192 --in 2048 --out 8192
    echo
    echo '## Whole training step (benchmarks/model_step.py)'
    echo
    # Without Transformer Engine even where it is installed: megatron-core's local layers would
    # otherwise take TE's fused Adam and RoPE (issue 18 asks for the BF16 baseline without TE).
    python3 benchmarks/without_te.py benchmarks/model_step.py --profile bf16 nvfp4-nohadamard averis \
        --json "${report%.md}-model-step.json"
    echo
    echo '## BF16 step with Transformer Engine layers (--transformer-impl transformer_engine)'
    echo
    if python3 -c "import transformer_engine.pytorch" 2>/dev/null; then
        # The same step with TE's fused layers (norm+linear, attention), beside the local BF16 above.
        python3 benchmarks/model_step.py --recipes bf16 --profile bf16 \
            --trainer-args='--transformer-impl transformer_engine' --json "${report%.md}-model-step-te.json"
    else
        echo "Transformer Engine is not installed here: skipped (the docker image has it; on the GPU"
        echo "machine, install the TE kit's wheels first)."
    fi
} 2>&1 | tee "$report"
