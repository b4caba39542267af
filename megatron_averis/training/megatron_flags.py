"""Megatron-LM's GPT pretraining flags that this program accepts beyond its own.

A command line written for Megatron-LM's `pretrain_gpt.py` (its Llama, Qwen and GPT example
scripts) parses here unchanged. Each such flag is in one of three tables:

- ARCHITECTURE: describes the model; values this program cannot build are refused with the flag
  and the supported values named (never silently ignored). Megatron-LM's defaults apply
  (learned absolute positions, LayerNorm, GeLU, biases, dropout 0.1), so a command without a
  --model-preset must ask for the Llama/Qwen3 architecture the way Megatron-LM's examples do.
- UNSUPPORTED: features this program does not have (FP16, FP8, MoE, batch-size ramp-up, ...);
  refused when given.
- NO_EFFECT: performance or implementation switches whose result here is the same with or
  without them; accepted, and each one given is listed with the reason at start-up and by
  --dry-run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Values the presets set explicitly (every preset is a Llama/Qwen3-style decoder), and the
# only values the model builders support.
DECODER_FLAGS = {
    "position_embedding_type": "rope",
    "normalization": "RMSNorm",
    "swiglu": True,
    "disable_bias_linear": True,
    "rotary_percent": 1.0,
    "group_query_attention": True,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
}

# Megatron-LM core_v0.16.1's defaults of the architecture flags (used without a preset).
MEGATRON_DEFAULTS = {
    "position_embedding_type": "learned_absolute",
    "normalization": "LayerNorm",
    "swiglu": False,
    "disable_bias_linear": False,
    "rotary_percent": 1.0,
    "group_query_attention": False,
    "attention_dropout": 0.1,
    "hidden_dropout": 0.1,
}


@dataclass(frozen=True)
class Supported:
    """`flag` may only take `values`; `fix` says how to get there."""

    dest: str
    flag: str
    values: tuple
    fix: str


ARCHITECTURE = (
    Supported("position_embedding_type", "--position-embedding-type", ("rope",),
              "pass --position-embedding-type rope (Megatron-LM's default is learned_absolute)"),
    Supported("normalization", "--normalization", ("RMSNorm",),
              "pass --normalization RMSNorm (Megatron-LM's default is LayerNorm)"),
    Supported("swiglu", "--swiglu", (True,),
              "pass --swiglu: the MLP is SwiGLU (without it Megatron-LM builds a GeLU MLP)"),
    Supported("disable_bias_linear", "--disable-bias-linear", (True,),
              "pass --disable-bias-linear: the linear layers have no biases"),
    Supported("rotary_percent", "--rotary-percent", (1.0,),
              "RoPE rotates the whole head; drop --rotary-percent or pass 1.0"),
)

_NO_BPE = ("GPT-2 BPE files are not read; use a sentencepiece model or a HuggingFace tokenizer "
           "directory with --tokenizer-model")


@dataclass(frozen=True)
class Unsupported:
    """A Megatron-LM feature this program does not have: refused when `flag` is given."""

    flag: str
    kind: str  # "switch" (store_true), "value" (one value), "triple" (three values)
    fix: str


UNSUPPORTED = {
    "fp16": Unsupported(
        "--fp16", "switch",
        "use --bf16 (or an --fp4-recipe, which trains with BF16 parameters)"),
    "fp8_format": Unsupported(
        "--fp8-format", "value",
        "FP8 is not implemented; use --fp4-recipe nvfp4 or averis"),
    "fp8_recipe": Unsupported(
        "--fp8-recipe", "value",
        "FP8 is not implemented; drop it"),
    "fp8_amax_history_len": Unsupported(
        "--fp8-amax-history-len", "value",
        "FP8 is not implemented; drop it"),
    "fp8_amax_compute_algo": Unsupported(
        "--fp8-amax-compute-algo", "value",
        "FP8 is not implemented; drop it"),
    "fp8_param_gather": Unsupported(
        "--fp8-param-gather", "switch",
        "FP8 is not implemented; drop it"),
    "fp4_param_gather": Unsupported(
        "--fp4-param-gather", "switch",
        "parameters stay BF16 (FP4 is applied per GEMM); drop it"),
    "apply_layernorm_1p": Unsupported(
        "--apply-layernorm-1p", "switch",
        "the norms are plain RMSNorm; drop it"),
    "add_qkv_bias": Unsupported(
        "--add-qkv-bias", "switch",
        "the linear layers have no biases; drop it"),
    "squared_relu": Unsupported(
        "--squared-relu", "switch",
        "the MLP is SwiGLU; use --swiglu"),
    "openai_gelu": Unsupported(
        "--openai-gelu", "switch",
        "the MLP is SwiGLU; use --swiglu"),
    "quick_geglu": Unsupported(
        "--quick-geglu", "switch",
        "the MLP is SwiGLU; use --swiglu"),
    "use_rope_scaling": Unsupported(
        "--use-rope-scaling", "switch",
        "Llama-3.1 RoPE scaling is a long-context extension, not applied in pretraining; drop it"),
    "num_experts": Unsupported(
        "--num-experts", "value",
        "mixture-of-experts layers are not implemented"),
    "multi_latent_attention": Unsupported(
        "--multi-latent-attention", "switch",
        "multi-latent attention is not implemented"),
    "use_legacy_models": Unsupported(
        "--use-legacy-models", "switch",
        "the model is megatron-core's GPTModel; drop it"),
    "rampup_batch_size": Unsupported(
        "--rampup-batch-size", "triple",
        "batch-size ramp-up is not implemented; use a fixed --global-batch-size"),
    "virtual_pipeline_model_parallel_size": Unsupported(
        "--virtual-pipeline-model-parallel-size", "value",
        "interleaved pipelining is not implemented; use --pipeline-model-parallel-size alone"),
    "vocab_file": Unsupported(
        "--vocab-file", "value",
        _NO_BPE),
    "merge_file": Unsupported(
        "--merge-file", "value",
        _NO_BPE),
}

# dest -> why the result does not depend on it here. Listed when given.
NO_EFFECT = {
    "use_mcore_models": "the model is always megatron-core's GPTModel",
    "use_flash_attn": "SDPA picks its flash kernel on GPUs by itself (no mask is passed)",
    "attention_backend": "attention is torch SDPA (local layers) or TE's DotProductAttention",
    "masked_softmax_fusion": "SDPA fuses the causal softmax itself",
    "bias_dropout_fusion": "megatron-core's bias-dropout-add fusion is chosen by device",
    "gradient_accumulation_fusion": "FP4 linears accumulate into main_grad themselves",
    "calculate_per_token_loss": "the loss is always the sum over the global batch's tokens "
                                "divided by their count",
    "log_throughput": "throughput is always logged",
    "manual_gc": "Python's garbage collector runs as usual",
    "empty_unused_memory_level": "the CUDA cache is not emptied between steps",
    "overlap_param_gather": "parameters are gathered right after the optimizer step",
    "create_attention_mask_in_dataloader": "no attention mask is built (causal SDPA)",
    "tiktoken_pattern": "only used by TikTokenizer",
    "profile": "use benchmarks/model_step.py --profile for a per-kernel profile",
    "profile_step_start": "see --profile",
    "profile_step_end": "see --profile",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The Megatron-LM flags of the three tables (their own group, Megatron-LM's defaults)."""
    g = parser.add_argument_group("Megatron-LM architecture flags (presets set them; "
                                  "unsupported values are refused)")
    g.add_argument("--position-embedding-type", default=None,
                   choices=("learned_absolute", "rope", "mrope", "relative", "none"),
                   help="Megatron-LM's default learned_absolute; supported: rope")
    g.add_argument("--use-rotary-position-embeddings", dest="position_embedding_type",
                   action="store_const", const="rope",
                   help="deprecated Megatron-LM spelling of --position-embedding-type rope")
    g.add_argument("--rotary-percent", type=float, default=None, help="supported: 1.0")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default=None,
                   help="Megatron-LM's default LayerNorm; supported: RMSNorm")
    g.add_argument("--swiglu", action="store_true", default=None,
                   help="SwiGLU MLP (required; Megatron-LM's default is GeLU)")
    g.add_argument("--disable-bias-linear", action="store_true", default=None,
                   help="no biases in linear layers (required)")
    g.add_argument("--group-query-attention", action="store_true", default=None,
                   help="use --num-query-groups key/value heads (without it: one per query head)")
    g.add_argument("--attention-dropout", type=float, default=None,
                   help="Megatron-LM's default 0.1; presets 0")
    g.add_argument("--hidden-dropout", type=float, default=None,
                   help="Megatron-LM's default 0.1; presets 0")

    g = parser.add_argument_group("Megatron-LM flags of features not implemented here "
                                  "(refused when given)")
    for dest, u in UNSUPPORTED.items():
        shape = {"switch": {"action": "store_true"}, "value": {"default": None},
                 "triple": {"nargs": 3, "default": None}}[u.kind]
        g.add_argument(u.flag, dest=dest, help=argparse.SUPPRESS, **shape)

    g = parser.add_argument_group("Megatron-LM performance flags (accepted; same result here)")
    g.add_argument("--use-mcore-models", action="store_true")
    g.add_argument("--use-flash-attn", action="store_true")
    g.add_argument("--attention-backend", choices=("auto", "flash", "fused", "unfused", "local"),
                   default="auto")
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion",
                   action="store_false")
    g.add_argument("--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion",
                   action="store_false")
    g.add_argument("--calculate-per-token-loss", action="store_true")
    g.add_argument("--log-throughput", action="store_true")
    g.add_argument("--manual-gc", action="store_true")
    g.add_argument("--empty-unused-memory-level", type=int, choices=(0, 1, 2), default=0)
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="needs --use-distributed-optimizer, as in Megatron-LM")
    g.add_argument("--no-create-attention-mask-in-dataloader",
                   dest="create_attention_mask_in_dataloader", action="store_false")
    g.add_argument("--tiktoken-pattern", default=None)
    g.add_argument("--profile", action="store_true")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)


def architecture_values(args, preset_given: bool) -> dict:
    """The architecture flags' values: as given, else the preset's, else Megatron-LM's defaults."""
    fallback = DECODER_FLAGS if preset_given else MEGATRON_DEFAULTS
    return {k: (getattr(args, k) if getattr(args, k) is not None else fallback[k])
            for k in DECODER_FLAGS}


def problems(args, values: dict) -> list[str]:
    """Every architecture value the model builders cannot build, and every unsupported flag."""
    found = []
    for s in ARCHITECTURE:
        if values[s.dest] not in s.values:
            shown = values[s.dest] if not isinstance(values[s.dest], bool) else (
                "given" if values[s.dest] else "absent")
            found.append(f"{s.flag}: {shown} is not supported (supported: "
                         f"{', '.join(map(_show, s.values))}); {s.fix}, or use --model-preset")
    defaults = _parser_defaults()
    for dest, u in UNSUPPORTED.items():
        if getattr(args, dest) != defaults[dest]:
            found.append(f"{u.flag} is not supported; {u.fix}")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        found.append("--overlap-param-gather needs --use-distributed-optimizer (as in Megatron-LM)")
    return found


def notes(args) -> list[str]:
    """One line per given flag of NO_EFFECT, saying why."""
    defaults, flags = _parser_defaults(), _flag_names()
    found = [f"{flags[dest]}: accepted, no effect here ({why})"
             for dest, why in NO_EFFECT.items() if getattr(args, dest) != defaults[dest]]
    if args.tokenizer_type == "SentencePieceTokenizer":
        found.append("--tokenizer-type SentencePieceTokenizer: read as GPTSentencePieceTokenizer "
                     "(end of document = the model's EOS; Megatron-LM's SentencePieceTokenizer "
                     "appends <CLS>/<SEP>/<EOD>/<MASK> to the vocabulary instead)")
    return found


def _show(value) -> str:
    return "given" if value is True else str(value)


_ACTIONS: list | None = None


def _actions() -> list:
    global _ACTIONS
    if _ACTIONS is None:
        p = argparse.ArgumentParser(add_help=False)
        add_flags(p)
        _ACTIONS = p._actions
    return _ACTIONS


def dests() -> frozenset[str]:
    """The namespace attributes of these flags."""
    return frozenset(a.dest for a in _actions())


def _parser_defaults() -> dict:
    return {a.dest: a.default for a in _actions()}


def _flag_names() -> dict:
    return {a.dest: a.option_strings[0] for a in _actions()}
