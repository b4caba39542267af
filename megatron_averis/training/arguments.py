"""Command line of `python -m megatron_averis.pretrain`: flags, defaults and start-up validation.

Flags carry Megatron-LM's names wherever the meaning is the same. `finalize_args` resolves the
model preset, the recipe and the derived sizes, and checks everything that can be checked before
any process group, model or dataset exists; it reports every problem at once, each with the change
that fixes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os

from megatron_averis.recipes import PRESETS as RECIPE_PRESETS
from megatron_averis.recipes import DEPRECATED_NAMES as DEPRECATED_RECIPES
from megatron_averis.numerics.backend import FP4_GEMMS, TOKEN_SUMS
from megatron_averis.recipes import RecipeError, canonical_name, check_linear_shape, check_token_count, get_recipe
from megatron_averis.training import divergence, fast_path, megatron_flags, preflight
from megatron_averis.training.checkpoint_dirs import find_latest_checkpoint
from megatron_averis.training.checkpoint_integrity import CHECKSUMS
from megatron_averis.training.config import FaultToleranceConfig
from megatron_averis.training.presets import PRESETS as MODEL_PRESETS
from megatron_averis.training.presets import ModelArch

FP4_RECIPES = tuple(name for name in RECIPE_PRESETS if name != "bf16")
FP4_RECIPE_CHOICES = FP4_RECIPES + ("custom",) + tuple(DEPRECATED_RECIPES)
# Megatron-LM's names; both sentencepiece names load the model as GPTSentencePieceTokenizer does
# (end of document = the model's EOS, no added tokens).
TOKENIZER_LIBRARIES = {"GPTSentencePieceTokenizer": "sentencepiece",
                       "SentencePieceTokenizer": "sentencepiece",
                       "HuggingFaceTokenizer": "huggingface", "NullTokenizer": None}
TOKENIZER_TYPES = tuple(TOKENIZER_LIBRARIES)
TRANSFORMER_IMPLS = ("local", "transformer_engine")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
# Architecture flags a preset fills in when they are not given (argparse dest -> ModelArch field).
ARCH_FLAGS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels",
    "qk_layernorm": "qk_layernorm",
    "rotary_base": "rotary_base",
    "norm_epsilon": "norm_epsilon",
    "max_position_embeddings": "max_position_embeddings",
    "init_method_std": "init_method_std",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where there is one to show."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class ConfigError(ValueError):
    """The command line cannot run; `problems` lists each reason with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_averis.pretrain",
        description="Pretrain a GPT model with megatron-core under a BF16 or FP4 (Averis) recipe. "
                    "Accepts Megatron-LM's pretrain_gpt.py flags with their meanings and defaults "
                    "(docs/training.md, 'Coming from Megatron-LM').",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--dry-run", action="store_true",
                   help="check everything (data, shapes, divisibility, save directory), print the "
                        "resolved configuration and exit 0 without training")

    g = p.add_argument_group("model")
    g.add_argument("--model-preset", choices=sorted(MODEL_PRESETS),
                   help="architecture preset; the flags below override single fields")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int,
                   help="key/value heads; used with --group-query-attention (as in Megatron-LM)")
    g.add_argument("--kv-channels", type=int, help="head dimension")
    g.add_argument("--qk-layernorm", action=argparse.BooleanOptionalAction, default=None,
                   help="RMSNorm on queries and keys (Qwen3)")
    g.add_argument("--rotary-base", type=float, help="RoPE theta")
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--init-method-std", type=float)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="separate output layer (default: tied, as in Megatron-LM and the presets)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the tokenizer's vocabulary to a multiple of this times TP")
    g.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=None,
                   help="default: transformer_engine with --fp4-recipe custom, else local. "
                        "local: our layers (FP4 recipes emulated or on Triton kernels); "
                        "transformer_engine: megatron-core's Transformer Engine layers with the "
                        "recipe as a TE CustomRecipe (needs TE >= 2.20 and CUDA; "
                        "docs/transformer-engine.md)")

    g = p.add_argument_group("precision and FP4 recipe")
    g.add_argument("--bf16", action="store_true",
                   help="BF16 parameters and activations, unquantized GEMMs (recipe 'bf16')")
    g.add_argument("--fp4-format", choices=("e2m1",), default=None,
                   help="FP4 GEMMs (Megatron-LM's switch; with it the recipe defaults to nvfp4)")
    g.add_argument("--fp4-recipe", choices=FP4_RECIPE_CHOICES,
                   help="FP4 GEMM recipe for the transformer layers' linears (implies --bf16 and "
                        "--fp4-format e2m1); custom: the recipe of --fp4-quantizer-factory")
    g.add_argument("--fp4-quantizer-factory", default=None, metavar="MODULE.ATTR",
                   help="with --fp4-recipe custom: a quantizer factory by Python path, e.g. "
                        "megatron_averis.te.factories.averis (as in Megatron-LM)")
    g.add_argument("--fp4-recipe-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one recipe knob, e.g. wgrad_rht=false or grads.rounding=rne "
                        "(repeatable; see docs/recipes.md)")
    g.add_argument("--fp4-token-sum", choices=TOKEN_SUMS, default=None,
                   help="order of the token sums behind every Averis mean (the recipe's "
                        "token_sum; default: the recipe's, pairwise): pairwise (a fixed tree order, "
                        "the same on every device; one read of the operand on the GPU) or torch "
                        "(torch.sum); they differ in the last bits (docs/performance.md)")
    g.add_argument("--fp4-gemm", choices=FP4_GEMMS, default=None,
                   help="FP4 GEMM path (the recipe's fp4_gemm; default: the recipe's, dequant): "
                        "dequant (BF16 operands, cuBLAS), fused (Triton GEMM on packed FP4), "
                        "native (FP4 tensor cores through Transformer Engine: "
                        "--transformer-impl transformer_engine on sm_100+) or auto (native where "
                        "it can run, else dequant); they differ in the last bits "
                        "(docs/performance.md)")
    g.add_argument("--first-last-layers-bf16", action="store_true",
                   help="keep the first/last transformer layers in BF16 under an FP4 recipe")
    g.add_argument("--num-layers-at-start-in-bf16", type=int, default=None,
                   help="with --first-last-layers-bf16 (default 1)")
    g.add_argument("--num-layers-at-end-in-bf16", type=int, default=None,
                   help="with --first-last-layers-bf16 (default 1)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP (1F1B schedule)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="CP; the trainer supports 1 (the layers themselves support more)")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state and FP32 main parameters over data-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduction with the backward pass")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="reduce data-parallel gradients in BF16 (default FP32)")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="default: nccl with CUDA, gloo on CPU")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)

    g = p.add_argument_group("batch and sequence")
    g.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward pass")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step (default: micro-batch x data-parallel size)")
    g.add_argument("--seq-length", type=int, default=None, help="required")

    g = p.add_argument_group("optimization")
    g.add_argument("--train-iters", type=int, default=None,
                   help="training length in global batches (this or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="training length in samples (Megatron-LM's sample-based training)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW); required")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="separate peak LR of the embedding and output layer")
    g.add_argument("--decoupled-min-lr", type=float, default=None)
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: the training length")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="with --train-samples; default: the training length")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up as a fraction of the decay length")
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-wsd-decay-style", choices=WSD_DECAY_STYLES, default="exponential")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="length of the final decay of the WSD schedule")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="= --recompute-granularity selective (as in Megatron-LM)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234,
                   help="seeds weights, data order and every RNG stream")
    g.add_argument("--deterministic-mode", action="store_true",
                   help="deterministic cuBLAS/NCCL and torch algorithms (torch raises on an op that "
                        "has none); for bit-exact GPU reruns, e.g. checking a resume")
    g.add_argument("--cuda-graph-impl", choices=fast_path.CUDA_GRAPH_IMPLS, default="none",
                   help="local: capture each iteration's forward-backward schedule as one CUDA graph "
                        "and replay it (removes the host overhead of the many small FP4 kernels); "
                        "auto (the launch scripts' choice): local where the run allows a capture, "
                        "else none, saying why at start-up; none: eager steps (Megatron-LM's "
                        "default)")
    g.add_argument("--cuda-graph-scope", choices=("full_iteration",), default="full_iteration",
                   help="what one graph covers; full_iteration (the optimizer step stays outside) is "
                        "the scope this trainer implements")
    g.add_argument("--cuda-graph-warmup-steps", type=int, default=3,
                   help="eager steps before the capture")

    g = p.add_argument_group("fused elementwise ops (on CUDA; docs/performance.md)")
    g.add_argument("--no-rope-fusion", dest="apply_rope_fusion", action="store_false",
                   help="unfused RoPE (default: megatron-core's rotation compiled by torch.compile, "
                        "or Transformer Engine's kernel where installed)")
    g.add_argument("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion", action="store_false",
                   help="unfused SwiGLU (default: megatron-core's torch.compile'd SwiGLU)")
    g.add_argument("--cross-entropy-loss-fusion", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="megatron-core's fused (torch.compile'd) vocab-parallel cross entropy; off "
                        "by default as in Megatron-LM, on in the launch scripts; BF16 runs only")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed-dataset prefixes, optionally weighted: 'P' or 'W1 P1 W2 P2 ...'; "
                        "split into train/valid/test by --split")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights for --data-path")
    g.add_argument("--train-data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)
    g.add_argument("--test-data-path", nargs="*", default=None)
    g.add_argument("--data-cache-path", default=None,
                   help="where megatron-core caches dataset indices (default: beside the data)")
    g.add_argument("--mock-data", action="store_true",
                   help="megatron-core's synthetic dataset (no files; needs --tokenizer-type "
                        "NullTokenizer --vocab-size N or a tokenizer)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="default: from --tokenizer-model (a .model file is SentencePiece, a "
                        "directory or .json HuggingFace), NullTokenizer with --mock-data alone")
    g.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model, or a local HuggingFace tokenizer directory / "
                        "tokenizer.json")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer's vocabulary (without its end-of-document token)")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="read .bin files without memory-mapping them")
    g.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")

    g = p.add_argument_group("validation")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="validate every N steps (default: only at the end, as in Megatron-LM)")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="global batches per validation (0: none); the same batches every time")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None,
                   help="checkpoint directory to resume from (may be the same as --save)")
    g.add_argument("--ckpt-step", type=int, default=None, help="load this iteration, not the latest")
    g.add_argument("--no-load-optim", action="store_true", help="load weights only")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start at iteration 0 (no optimizer, RNG, scheduler "
                        "or data position), as in Megatron-LM")
    g.add_argument("--ckpt-format", choices=("torch_dist", "torch", "torch_dcp", "zarr",
                                             "fsdp_dtensor"), default="torch_dist",
                   help="supported: torch_dist (megatron-core dist_checkpointing)")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="distributed-optimizer state loadable under any parallel layout "
                        "(gathers on save); default: reshardable over data-parallel size only")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, save a checkpoint and exit (SLURM preemption)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save a checkpoint and exit once training has run this long")

    g = p.add_argument_group("fault tolerance (docs/training.md#when-things-go-wrong)")
    g.add_argument("--allow-fresh-start", action="store_true",
                   help="train from scratch when --load holds no checkpoint (without it, a --load "
                        "other than --save must hold one)")
    g.add_argument("--ckpt-integrity", choices=CHECKSUMS, default="sha256",
                   help="what each checkpoint's manifest records and loading verifies: file sizes "
                        "and SHA-256, or sizes only (faster for very large checkpoints)")
    g.add_argument("--ckpt-fallback", action="store_true",
                   help="when the checkpoint to load is damaged, load the newest intact earlier "
                        "one (default: stop and name it)")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction,
                   default=True, help="treat a NaN/Inf loss or gradient norm as divergence")
    g.add_argument("--check-for-spiky-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="treat a loss above --spiky-loss-factor x the running median as divergence")
    g.add_argument("--spiky-loss-factor", type=float, default=divergence.DEFAULT_LOSS_FACTOR,
                   help="multiple of the running median loss that counts as a spike")
    g.add_argument("--check-for-large-grads", action="store_true",
                   help="treat a gradient norm above --large-grads-factor x the running median as "
                        "divergence")
    g.add_argument("--large-grads-factor", type=float, default=divergence.DEFAULT_GRAD_FACTOR,
                   help="multiple of the running median gradient norm that counts as a spike")
    g.add_argument("--divergence-window", type=int, default=divergence.DEFAULT_WINDOW,
                   help="healthy steps in the running medians")
    g.add_argument("--divergence-action", choices=divergence.ACTIONS, default="abort",
                   help="abort: stop without saving; skip: drop the step's update and go on")
    g.add_argument("--max-skipped-steps", type=int, default=divergence.DEFAULT_MAX_SKIPS,
                   help="with --divergence-action skip: abort after this many skipped steps in a row")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--run-name", default=None, help="default: <preset>-<recipe>")
    g.add_argument("--log-dir", default=None,
                   help="metrics.jsonl, config.json, TensorBoard (default: --save, else runs/<run-name>)")
    g.add_argument("--tensorboard-dir", default=None, help="default: <log-dir>/tensorboard")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-GPU peak for MFU (default: dense BF16 peak of known GPUs)")
    g.add_argument("--wandb-mode", choices=("online", "offline", "disabled"), default=None,
                   help="default: offline when wandb is installed (sync later with `wandb sync`)")
    g.add_argument("--wandb-project", default="megatron-averis")
    g.add_argument("--wandb-entity", default=None, help="team or user owning the project")
    g.add_argument("--wandb-group", default=None, help="default: the model preset")
    g.add_argument("--wandb-exp-name", default=None, help="default: the run name")
    g.add_argument("--wandb-save-dir", default=None, help="default: <log-dir>/wandb")
    megatron_flags.add_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _arch_from_args(args, problems: list[str]) -> ModelArch | None:
    preset = MODEL_PRESETS[args.model_preset].arch if args.model_preset else None
    flags = megatron_flags.architecture_values(args, preset is not None)
    problems += megatron_flags.problems(args, flags)
    values = {}
    for dest, field in ARCH_FLAGS.items():
        v = getattr(args, dest)
        if v is None and preset is not None:
            v = getattr(preset, field)
        values[field] = v
    if not flags["group_query_attention"]:
        # Megatron-LM uses --num-query-groups only with --group-query-attention.
        if args.num_query_groups is not None and args.num_query_groups != values["num_attention_heads"]:
            problems.append(f"--num-query-groups {args.num_query_groups} needs "
                            "--group-query-attention (Megatron-LM ignores it without); add it")
        values["num_query_groups"] = values["num_attention_heads"]
    elif values["num_query_groups"] is None:
        values["num_query_groups"] = values["num_attention_heads"]
    values["attention_dropout"] = flags["attention_dropout"]
    values["hidden_dropout"] = flags["hidden_dropout"]
    if values["kv_channels"] is None and values["hidden_size"] and values["num_attention_heads"]:
        if values["hidden_size"] % values["num_attention_heads"]:
            problems.append(f"--hidden-size {values['hidden_size']} is not divisible by "
                            f"--num-attention-heads {values['num_attention_heads']}; "
                            "set --kv-channels (the head dimension) explicitly")
            return None
        values["kv_channels"] = values["hidden_size"] // values["num_attention_heads"]
    defaults = {"qk_layernorm": False, "rotary_base": 10000.0, "norm_epsilon": 1e-5,
                "init_method_std": 0.02}
    for k, v in defaults.items():
        if values[k] is None:
            values[k] = v
    if values["ffn_hidden_size"] is None and values["hidden_size"]:
        # Megatron-LM's SwiGLU default: 2/3 of 4h (the same parameters as a 4h GeLU MLP),
        # rounded down to a multiple of 64.
        values["ffn_hidden_size"] = (int(4 * values["hidden_size"] * 2 / 3 / 64) * 64
                                     if flags["swiglu"] else 4 * values["hidden_size"])
    if values["max_position_embeddings"] is None:
        values["max_position_embeddings"] = args.seq_length
    missing = [f"--{k.replace('_', '-')}" for k in ("num_layers", "hidden_size", "num_attention_heads")
               if values[k] is None]
    if missing:
        problems.append(f"the model is not defined: give --model-preset {{{','.join(sorted(MODEL_PRESETS))}}} "
                        f"or {' '.join(missing)}")
        return None
    tie = preset.tie_embeddings if preset is not None else True
    values["tie_embeddings"] = tie and not args.untie_embeddings_and_output_weights
    return ModelArch(**values)


def _recipe_name(args, problems: list[str]) -> str | None:
    """The FP4 preset to run, from Megatron-LM's --fp4-format / --fp4-recipe /
    --fp4-quantizer-factory: --fp4-format e2m1 alone is Megatron-LM's default recipe nvfp4; a
    recipe name implies --fp4-format e2m1; custom runs the factory's recipe."""
    name = args.fp4_recipe
    if name is None and args.fp4_format:
        name = "nvfp4"
    if args.fp4_quantizer_factory and name != "custom":
        problems.append("--fp4-quantizer-factory is read only with --fp4-recipe custom; add it, "
                        "or drop the factory and name the recipe with --fp4-recipe")
    if name == "custom":
        if not args.fp4_quantizer_factory:
            problems.append("--fp4-recipe custom needs --fp4-quantizer-factory MODULE.ATTR, e.g. "
                            "megatron_averis.te.factories.averis")
            return None
        from megatron_averis.te.factories import resolve

        try:
            name = resolve(args.fp4_quantizer_factory).recipe.name
        except ValueError as e:
            problems.append(f"--fp4-quantizer-factory: {e}")
            return None
    if name:
        args.fp4_format = "e2m1"
        name = canonical_name(name)  # a deprecated name warns here, once
    return name


def _recipe_from_args(args, problems: list[str]):
    args.fp4_recipe_requested = args.fp4_recipe
    args.fp4_recipe = _recipe_name(args, problems)
    if args.transformer_impl is None:
        # Megatron-LM's custom recipe is a Transformer Engine CustomRecipe.
        custom = args.fp4_recipe_requested == "custom"
        args.transformer_impl = "transformer_engine" if custom else "local"
    overrides = list(args.fp4_recipe_override)
    # The implementation flags come last: they override the recipe and its overrides.
    overrides += [f"{field}={value}" for field, value in (("token_sum", args.fp4_token_sum),
                                                           ("fp4_gemm", args.fp4_gemm))
                  if value is not None]
    if args.first_last_layers_bf16:
        start = 1 if args.num_layers_at_start_in_bf16 is None else args.num_layers_at_start_in_bf16
        end = 1 if args.num_layers_at_end_in_bf16 is None else args.num_layers_at_end_in_bf16
        overrides += [f"bf16_first_layers={start}", f"bf16_last_layers={end}"]
    elif args.num_layers_at_start_in_bf16 is not None or args.num_layers_at_end_in_bf16 is not None:
        problems.append("--num-layers-at-start/end-in-bf16 have no effect without "
                        "--first-last-layers-bf16; add it or drop them")
    if not args.fp4_recipe and (args.fp4_recipe_override or args.first_last_layers_bf16
                                or args.fp4_token_sum or args.fp4_gemm):
        problems.append("--fp4-recipe-override / --first-last-layers-bf16 / --fp4-token-sum / "
                        "--fp4-gemm change an FP4 recipe; "
                        f"choose one with --fp4-recipe {{{','.join(FP4_RECIPES)}}}")
        return get_recipe("bf16")
    try:
        return get_recipe(args.fp4_recipe or "bf16", overrides)
    except RecipeError as e:
        problems.append(f"{e} (from --fp4-recipe / --fp4-recipe-override)")
        return None


def _tokenizer_problems(args) -> list[str]:
    """Resolve --tokenizer-type as Megatron-LM names it; the files it needs must exist."""
    if args.tokenizer_type is None:
        args.tokenizer_type = (_detect_tokenizer_type(args.tokenizer_model) if args.tokenizer_model
                               else "NullTokenizer" if args.mock_data else None)
    kind = args.tokenizer_type
    if kind is None:
        return ["no tokenizer: give --tokenizer-model (a sentencepiece .model or a HuggingFace "
                "tokenizer directory), or --mock-data --tokenizer-type NullTokenizer "
                "--vocab-size N"]
    if kind == "NullTokenizer":
        if args.vocab_size is None or args.vocab_size < 1:
            return ["--tokenizer-type NullTokenizer needs --vocab-size N (its vocabulary without "
                    "the end-of-document token)"]
        return []
    if not args.tokenizer_model:
        return [f"--tokenizer-type {kind} needs --tokenizer-model"]
    if not os.path.exists(args.tokenizer_model):
        hub = (" (model names are not downloaded: give a local directory, e.g. one saved with "
               "huggingface-cli download)" if kind == "HuggingFaceTokenizer" else "")
        return [f"--tokenizer-model {args.tokenizer_model!r} does not exist{hub}; give a "
                "sentencepiece .model or a HuggingFace tokenizer directory / tokenizer.json "
                "(tools/train_tokenizer.py trains one)"]
    detected = _detect_tokenizer_type(args.tokenizer_model)
    if TOKENIZER_LIBRARIES[detected] != TOKENIZER_LIBRARIES[kind]:
        return [f"--tokenizer-type {kind} but --tokenizer-model {args.tokenizer_model!r} is a "
                f"{detected} file; give the matching --tokenizer-type"]
    return []


def _detect_tokenizer_type(path: str) -> str:
    from megatron_averis.data.backends import detect_library

    return {"sentencepiece": "GPTSentencePieceTokenizer",
            "huggingface": "HuggingFaceTokenizer"}[detect_library(path)]


def _blend_problems(flag: str, values: list[str] | None) -> list[str]:
    """Prefixes of 'P ...' or 'W1 P1 W2 P2 ...' must exist as .bin/.idx pairs."""
    if values is None:
        return []
    if not values:
        return [f"{flag} is empty; give at least one dataset prefix"]
    weighted = len(values) % 2 == 0 and all(_is_number(v) for v in values[0::2])
    prefixes = values[1::2] if weighted else values
    problems = []
    if len(values) % 2 == 0 and not weighted and any(_is_number(v) for v in values):
        problems.append(f"{flag}: mix of weights and prefixes {values}; use 'W1 P1 W2 P2 ...' or "
                        "prefixes only")
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            problems.append(f"{flag}: dataset {prefix!r} has no {' / '.join(prefix + m for m in missing)}; "
                            "pass the prefix of files written by tools/preprocess_data.py "
                            "(without .bin/.idx)")
        else:
            problems += preflight.indexed_dataset_problems(flag, prefix)
    return problems


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _split_weights(split: str) -> list[float] | None:
    try:
        w = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        return None
    return w + [0.0] * (3 - len(w)) if 1 <= len(w) <= 3 and all(x >= 0 for x in w) and sum(w) > 0 \
        else None


def _split_coverage_problems(values: list[str], split: str, weights: list[float],
                             used: tuple[bool, bool, bool]) -> list[str]:
    """Every dataset of --data-path must hold at least one sequence in each split that is read:
    megatron-core cuts each dataset by --split (rounding to whole sequences) and loops forever
    trying to draw samples from an empty part. Unread splits are not built (data.py)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    weighted = len(values) % 2 == 0 and all(_is_number(v) for v in values[0::2])
    prefixes = values[1::2] if weighted else values
    total = sum(weights)
    bounds, acc = [], 0.0
    for w in weights:
        bounds.append((acc / total, (acc + w) / total))
        acc += w
    problems = []
    for prefix in prefixes:
        n = len(IndexedDataset(prefix))  # readable: _blend_problems checked the files
        for name, w, (lo, hi), read in zip(("train", "valid", "test"), weights, bounds, used):
            if read and w > 0 and int(round(hi * n)) - int(round(lo * n)) < 1:
                problems.append(
                    f"--data-path: {prefix!r} holds {n} sequences (documents), so --split {split} "
                    f"leaves its {name} part empty; give {name} a share of at least one of its "
                    "sequences" + (", or 0 to have no test split" if name == "test" else "")
                    + ", drop the dataset, or give each split its own datasets with "
                    "--train-data-path / --valid-data-path / --test-data-path")
    return problems


def _transformer_engine_problems() -> list[str]:
    """--transformer-impl transformer_engine: TE must import (checked only when asked for)."""
    import torch

    from megatron_averis.te.availability import TransformerEngineMissing, require_te

    if not torch.cuda.is_available():
        return ["--transformer-impl transformer_engine needs CUDA GPUs (Transformer Engine has no "
                "CPU path); use --transformer-impl local here"]
    try:
        require_te()
    except TransformerEngineMissing as e:
        return [str(e)]
    return []


def _native_gemm_problems(args) -> list[str]:
    """fp4_gemm=native: the FP4 tensor cores are reached only through Transformer Engine's GEMM
    on sm_100+ (te/native.py)."""
    import torch

    fix = "; use --fp4-gemm auto (native where it can run) or dequant"
    if args.transformer_impl != "transformer_engine":
        return ["--fp4-gemm native runs only on the Transformer Engine route: add "
                "--transformer-impl transformer_engine" + fix]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (10, 0):
        name = torch.cuda.get_device_name()
        return [f"--fp4-gemm native needs FP4 tensor cores (sm_100+); this GPU ({name}) has "
                "none" + fix]
    return []


def _fp4_shape_problems(args, arch: ModelArch, recipe) -> list[str]:
    """The quantized GEMMs' dimensions (per tensor-parallel rank) must split into whole blocks."""
    tp = args.tensor_model_parallel_size
    q, kv = arch.num_attention_heads * arch.kv_channels, arch.num_query_groups * arch.kv_channels
    h, f = arch.hidden_size, arch.ffn_hidden_size
    shapes = {"linear_qkv": (h, (q + 2 * kv) // tp), "linear_proj": (q // tp, h),
              "linear_fc1": (h, 2 * f // tp), "linear_fc2": (f // tp, h)}
    problems = []
    for name, (fin, fout) in shapes.items():
        try:
            check_linear_shape(recipe, fin, fout, f"{name} (per TP rank)")
        except RecipeError as e:
            problems.append(f"{e}; change the model size or --tensor-model-parallel-size")
    # Under sequence parallelism a rank's share may straddle blocks: the layer then gathers BF16
    # instead of FP4 (linear.function._gathers_fp4), so only the whole micro-batch must fit.
    tokens = args.micro_batch_size * args.seq_length
    try:
        check_token_count(recipe, tokens, "tokens per micro-batch")
    except RecipeError as e:
        problems.append(f"{e} (--micro-batch-size {args.micro_batch_size} x --seq-length "
                        f"{args.seq_length})")
    return problems


def _megatron_semantics(args) -> list[str]:
    """Megatron-LM's flag pairs: which unit the schedule uses, aliases, and what only one value
    is supported for in this trainer."""
    problems = []
    unit, other = ("samples", "iters") if args.train_samples is not None else ("iters", "samples")
    for name in ("lr_decay", "lr_warmup", "lr_wsd_decay"):
        flag = "--" + name.replace("_", "-")
        if getattr(args, f"{name}_{other}") not in (None, 0):
            problems.append(f"{flag}-{other} does not go with --train-{unit} (Megatron-LM: "
                            f"{unit}-based training); use {flag}-{unit}")
    if args.lr_warmup_fraction is not None and (args.lr_warmup_iters or args.lr_warmup_samples):
        problems.append("give one of --lr-warmup-fraction and --lr-warmup-iters/samples")
    if args.recompute_activations:
        args.recompute_granularity = args.recompute_granularity or "selective"
    if args.context_parallel_size != 1:
        problems.append(f"--context-parallel-size {args.context_parallel_size} is not supported by "
                        "this trainer (supported: 1); shard long sequences with "
                        "--tensor-model-parallel-size and --sequence-parallel")
    if args.ckpt_format != "torch_dist":
        problems.append(f"--ckpt-format {args.ckpt_format} is not supported (supported: "
                        "torch_dist, Megatron-LM's default)")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        problems.append("--exit-duration-in-mins must be > 0")
    if args.finetune and not args.load:
        problems.append("--finetune loads the weights of --load DIR; give --load")
    return problems


def schedule_in_samples(args) -> dict:
    """Megatron-LM's schedule lengths in samples, from iteration- or sample-based flags:
    train, decay (default: the training length), warm-up (--lr-warmup-fraction of the decay, else
    the warm-up flag) and the WSD decay (None without one)."""
    gbs = args.global_batch_size
    if args.train_samples is not None:
        train = args.train_samples
        decay = args.lr_decay_samples if args.lr_decay_samples is not None else train
        warmup = args.lr_warmup_samples
        wsd = args.lr_wsd_decay_samples
    else:
        train = args.train_iters * gbs
        decay = (args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters) * gbs
        warmup = args.lr_warmup_iters * gbs
        wsd = args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters is not None else None
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * decay)
    return {"train": train, "decay": decay, "warmup": warmup, "wsd": wsd}


def _schedule_problems(args) -> list[str]:
    steps = schedule_in_samples(args)
    args.lr_schedule_samples = steps
    problems = []
    if not 0 <= steps["warmup"] < max(steps["decay"], 1):
        problems.append(f"the LR warm-up ({steps['warmup']} samples) must be >= 0 and shorter than "
                        f"the decay ({steps['decay']} samples); lower --lr-warmup-iters/samples/"
                        "fraction or raise --lr-decay-iters/samples")
    if args.lr_decay_style == "WSD":
        if steps["wsd"] is None:
            problems.append("--lr-decay-style WSD needs --lr-wsd-decay-iters (or -samples): the "
                            "length of the final decay, e.g. 20% of the training")
        elif not 0 < steps["wsd"] <= steps["decay"] - steps["warmup"]:
            problems.append(f"the WSD decay ({steps['wsd']} samples, --lr-wsd-decay-iters/samples) "
                            f"must be in (0, decay - warm-up = {steps['decay'] - steps['warmup']}] "
                            "samples")
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        problems.append("--decoupled-min-lr needs --decoupled-lr")
    return problems


def finalize_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Resolve preset, recipe and derived sizes in place; raise ConfigError listing every problem."""
    problems: list[str] = []
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for flag, v in (("--seq-length", args.seq_length), ("--lr", args.lr)):
        if v is None:
            problems.append(f"{flag} is required")
    if (args.train_iters is None) == (args.train_samples is None):
        problems.append("give the training length with exactly one of --train-iters and "
                        "--train-samples")
    if problems:  # everything below needs these
        raise ConfigError(problems)
    problems += _megatron_semantics(args)

    arch = _arch_from_args(args, problems)
    recipe = _recipe_from_args(args, problems)
    args.arch, args.recipe = arch, recipe
    args.bf16 = bool(args.bf16 or args.fp4_recipe)
    if recipe is not None and recipe.is_bf16 and not args.bf16:
        # Unquantized GEMMs on FP32 parameters: label the run what it is.
        args.recipe = recipe = dataclasses.replace(recipe, name="fp32")
    args.run_name = args.run_name or f"{args.model_preset or 'custom'}-{args.fp4_recipe or ('bf16' if args.bf16 else 'fp32')}"

    # Parallel layout and batch.
    for flag, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                    ("--micro-batch-size", args.micro_batch_size), ("--seq-length", args.seq_length),
                    ("--train-iters", args.train_iters), ("--train-samples", args.train_samples)):
        if v is not None and v < 1:
            problems.append(f"{flag} must be >= 1, got {v}")
    if world_size % (tp * pp):
        problems.append(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; "
                        "launch a multiple of TP x PP processes or change the parallel sizes")
        args.data_parallel_size = 1
    else:
        args.data_parallel_size = world_size // (tp * pp)
    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    per_step = args.micro_batch_size * dp
    if per_step and args.global_batch_size % per_step:
        lo = max(per_step, args.global_batch_size - args.global_batch_size % per_step)
        problems.append(f"--global-batch-size {args.global_batch_size} is not divisible by "
                        f"--micro-batch-size x data-parallel size = {args.micro_batch_size} x {dp} = "
                        f"{per_step}; use e.g. --global-batch-size {lo} or {lo + per_step}")
    args.num_microbatches = max(1, args.global_batch_size // max(per_step, 1))
    if args.train_samples is not None:
        # Megatron-LM's sample-based training: as many whole global batches as fit.
        args.train_iters = args.train_samples // args.global_batch_size
        if args.train_iters < 1:
            problems.append(f"--train-samples {args.train_samples} is less than one global batch "
                            f"({args.global_batch_size})")

    if args.sequence_parallel and tp == 1:
        problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1; drop it or raise TP")
    if args.sequence_parallel and tp > 1 and args.seq_length % tp:
        problems.append(f"--seq-length {args.seq_length} is not divisible by TP {tp}, as "
                        "--sequence-parallel requires")

    if arch is not None:
        if arch.num_attention_heads % tp:
            problems.append(f"TP {tp} does not divide the {arch.num_attention_heads} attention heads; "
                            "choose --tensor-model-parallel-size among its divisors")
        if arch.num_query_groups % tp:
            problems.append(f"TP {tp} does not divide the {arch.num_query_groups} key/value heads "
                            "(--num-query-groups); choose a TP size that divides it")
        if arch.num_attention_heads % arch.num_query_groups:
            problems.append(f"--num-attention-heads {arch.num_attention_heads} is not a multiple of "
                            f"--num-query-groups {arch.num_query_groups}")
        if arch.ffn_hidden_size % tp:
            problems.append(f"TP {tp} does not divide --ffn-hidden-size {arch.ffn_hidden_size}")
        if arch.num_layers % pp:
            problems.append(f"--num-layers {arch.num_layers} is not divisible by "
                            f"--pipeline-model-parallel-size {pp}; every stage holds the same number "
                            "of layers")
        if args.seq_length > arch.max_position_embeddings:
            problems.append(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                            f"{arch.max_position_embeddings}")
        if recipe is not None:
            edge = recipe.bf16_first_layers + recipe.bf16_last_layers
            if edge > arch.num_layers:
                problems.append(f"{edge} BF16 edge layers requested but the model has "
                                f"{arch.num_layers}; lower --num-layers-at-start/end-in-bf16")
            if not recipe.is_bf16:
                problems += _fp4_shape_problems(args, arch, recipe)

    if recipe is not None and recipe.fp4_gemm == "native":
        problems += _native_gemm_problems(args)
    if args.transformer_impl == "transformer_engine":
        problems += _transformer_engine_problems()
        if recipe is not None:
            from megatron_averis.te.factories import check_te_recipe

            try:
                check_te_recipe(recipe)
            except RecipeError as e:
                problems.append(str(e))

    # Learning-rate schedule.
    if args.lr <= 0:
        problems.append(f"--lr must be > 0, got {args.lr}")
    if args.min_lr > args.lr:
        problems.append(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    problems += _schedule_problems(args)
    if args.recompute_granularity == "full" and (args.recompute_method is None
                                                 or args.recompute_num_layers is None):
        problems.append("--recompute-granularity full needs --recompute-method {uniform,block} and "
                        "--recompute-num-layers N")

    problems += fast_path.resolve(args)

    # Data and tokenizer.
    problems += _tokenizer_problems(args)
    per_split = any(x is not None for x in (args.train_data_path, args.valid_data_path,
                                            args.test_data_path))
    if args.mock_data + (args.data_path is not None) + per_split > 1:
        problems.append("give one data source: --mock-data, --data-path (with --split) or "
                        "--train/valid/test-data-path")
    elif not args.mock_data and args.data_path is None and args.train_data_path is None:
        problems.append("no training data: give --data-path PREFIX (or 'W1 P1 W2 P2 ...'), "
                        "--train-data-path, or --mock-data")
    problems += _blend_problems("--data-path", args.data_path)
    for split in ("train", "valid", "test"):
        problems += _blend_problems(f"--{split}-data-path", getattr(args, f"{split}_data_path"))
    if args.data_path is not None or args.mock_data:
        weights = _split_weights(args.split)
        if weights is None:
            problems.append(f"--split {args.split!r} must be up to three non-negative weights "
                            "'train,valid,test' with a positive sum, e.g. 969,30,1")
        elif weights[0] == 0:
            problems.append(f"--split {args.split!r} leaves no training data; give train a weight")
        has_valid = weights is not None and weights[1] > 0
        args.has_test_data = weights is not None and weights[2] > 0
    else:
        has_valid = args.valid_data_path is not None
        args.has_test_data = args.test_data_path is not None
    if args.eval_iters < 0 or (args.eval_interval is not None and args.eval_interval < 1):
        problems.append("--eval-iters must be >= 0 and --eval-interval >= 1")
    if args.eval_iters > 0 and not has_valid:
        problems.append("validation is on (--eval-iters > 0) but there is no validation data: give "
                        "--split with a validation weight, --valid-data-path, or --eval-iters 0")
    args.has_valid_data = has_valid and args.eval_iters > 0
    if (args.data_path is not None and weights is not None and weights[0] > 0
            and not _blend_problems("--data-path", args.data_path)):
        used = (True, args.has_valid_data, args.has_test_data and args.eval_iters > 0)
        problems += _split_coverage_problems(args.data_path, args.split, weights, used)

    # Checkpoints.
    if args.save_interval is not None and args.save_interval < 1:
        problems.append("--save-interval must be >= 1")
    if args.save_interval is not None and not args.save:
        problems.append("--save-interval needs --save DIR")
    if args.save and importlib.util.find_spec("psutil") is None:
        # megatron-core's torch_dist checkpoint writer needs it in its worker processes, and
        # without it the save hangs rather than failing.
        problems.append("--save needs the psutil package (megatron-core's checkpoint writer uses "
                        "it); `pip install psutil`")
    if args.exit_signal_handler and not args.save:
        problems.append("--exit-signal-handler saves a checkpoint on SIGTERM and needs --save DIR")
    if args.ckpt_step is not None and not args.load:
        problems.append("--ckpt-step needs --load DIR")
    problems += preflight.load_problems(args)
    problems += divergence.flag_problems(FaultToleranceConfig.from_args(args))
    if args.save and not args.load:
        try:
            latest = find_latest_checkpoint(args.save)
        except (FileNotFoundError, ValueError, KeyError) as e:
            problems.append(f"--save {args.save!r}: {e}")
            latest = None
        if latest is not None:
            problems.append(f"--save {args.save!r} already holds a checkpoint (iteration "
                            f"{latest[0]}); resume it with --load {args.save}, or choose an empty "
                            "--save directory")

    # Logging.
    if args.log_interval < 1:
        problems.append("--log-interval must be >= 1")
    if args.wandb_mode in ("online", "offline") and importlib.util.find_spec("wandb") is None:
        problems.append(f"--wandb-mode {args.wandb_mode} but wandb is not installed; "
                        "`pip install wandb`, or drop --wandb-mode")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        problems.append("--peak-tflops must be > 0")
    args.log_dir = args.log_dir or args.save or os.path.join("runs", args.run_name)
    args.tensorboard_dir = args.tensorboard_dir or os.path.join(args.log_dir, "tensorboard")

    if problems:
        raise ConfigError(problems)
    args.ignored_flags = megatron_flags.notes(args)
    return args


def resolved_config(args) -> dict:
    """The finalized command line as JSON-ready data: every flag, the architecture and recipe."""
    import json

    cfg = {k: v for k, v in vars(args).items() if k not in ("arch", "recipe")}
    cfg["arch"] = args.arch.as_dict()
    cfg["recipe"] = dataclasses.asdict(args.recipe)
    return json.loads(json.dumps(cfg, default=str))
