"""The typed configuration a run is built from.

`TrainingConfig` is made once per launch, by `TrainingConfig.from_args`, from the namespace that
arguments.finalize_args validated and resolved, when the tokenizer has sized the vocabulary. It
is frozen and grouped by concern; the trainer (training/loop.py) and everything it builds (model,
optimizer, LR schedule, data, checkpoints, logs, divergence guard, CUDA graph) read it, never the
namespace. Each field carries the name of the flag (argparse dest) it comes from, so a field
means what the flag's help says.

`ModelConfig` holds everything that decides this rank's GPTModel: architecture, recipe, precision,
padded vocabulary, parallel layout and recomputation. training/model.py builds from it alone;
diagnostics.checkpoint makes one from a checkpoint's saved configuration.

Flags that finalize_args folds into other values (the architecture flags into `arch`, the recipe
flags into `recipe` (--fp4-token-sum / --fp4-gemm into its token_sum / fp4_gemm fields), iteration/sample schedule lengths into `lr_schedule_samples`, Megatron-LM
flags without effect into `ignored_flags`) have no field: FOLDED_AT_FINALIZE names them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping

from megatron_averis.recipes import Recipe
from megatron_averis.training.presets import ModelArch, padded_vocab_size


def _frozen(value):
    """Lists become tuples and dicts read-only views, so a frozen config cannot change in place."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return MappingProxyType(value)
    return value


class _FromFlags:
    """A config whose fields are named after the flags (argparse dests) they hold."""

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: _frozen(getattr(args, f.name)) for f in fields(cls)})


@dataclass(frozen=True)
class ModelConfig(_FromFlags):
    arch: ModelArch
    recipe: Recipe
    bf16: bool
    padded_vocab_size: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    recompute_granularity: str | None = None  # "full" | "selective"
    recompute_method: str | None = None       # "uniform" | "block"
    recompute_num_layers: int | None = None
    transformer_impl: str = "local"           # "local" | "transformer_engine"
    # Fused elementwise ops asked for (megatron/fusions.py decides what runs on the device).
    apply_rope_fusion: bool = True
    bias_swiglu_fusion: bool = True
    cross_entropy_loss_fusion: bool = False

    @property
    def uses_te(self) -> bool:
        return self.transformer_impl == "transformer_engine"

    @property
    def fusions(self):
        """megatron.fusions.Fusions of these flags (imported here: it loads megatron-core)."""
        from megatron_averis.megatron.fusions import Fusions

        return Fusions.from_flags(self)


@dataclass(frozen=True)
class ParallelConfig(_FromFlags):
    """Process groups and data parallelism (TP, PP and SP shape the model: ModelConfig)."""
    data_parallel_size: int
    use_distributed_optimizer: bool
    overlap_grad_reduce: bool
    grad_reduce_in_bf16: bool
    distributed_backend: str | None
    distributed_timeout_minutes: int


@dataclass(frozen=True)
class OptimizerConfig(_FromFlags):
    """AdamW and gradient clipping."""
    lr: float
    min_lr: float
    decoupled_lr: float | None
    decoupled_min_lr: float | None
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float


@dataclass(frozen=True)
class ScheduleConfig(_FromFlags):
    """The LR schedule; peak and floor are OptimizerConfig.lr/min_lr."""
    lr_warmup_init: float
    lr_decay_style: str
    lr_wsd_decay_style: str
    # In samples: train, decay, warmup, wsd (None without a WSD decay); arguments.schedule_in_samples.
    lr_schedule_samples: Mapping[str, int | None]


@dataclass(frozen=True)
class BatchConfig(_FromFlags):
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    seq_length: int
    train_iters: int


@dataclass(frozen=True)
class DataConfig(_FromFlags):
    """Datasets, tokenizer and validation."""
    data_path: tuple[str, ...] | None
    split: str
    train_data_path: tuple[str, ...] | None
    valid_data_path: tuple[str, ...] | None
    test_data_path: tuple[str, ...] | None
    data_cache_path: str | None
    mock_data: bool
    mmap_bin_files: bool
    num_workers: int
    tokenizer_type: str
    tokenizer_model: str | None
    vocab_size: int | None           # NullTokenizer's
    tokenizer_vocab_size: int        # the loaded tokenizer's
    has_valid_data: bool
    has_test_data: bool
    eval_iters: int
    eval_interval: int | None


@dataclass(frozen=True)
class CheckpointConfig(_FromFlags):
    save: str | None
    save_interval: int | None
    load: str | None
    ckpt_step: int | None
    no_load_optim: bool
    no_load_rng: bool
    finetune: bool
    dist_ckpt_optim_fully_reshardable: bool
    ckpt_integrity: str
    ckpt_fallback: bool
    allow_fresh_start: bool
    exit_signal_handler: bool
    exit_duration_in_mins: float | None


@dataclass(frozen=True)
class FaultToleranceConfig(_FromFlags):
    """The divergence guard (training/divergence.py)."""
    check_for_nan_in_loss_and_grad: bool
    check_for_spiky_loss: bool
    spiky_loss_factor: float
    check_for_large_grads: bool
    large_grads_factor: float
    divergence_window: int
    divergence_action: str
    max_skipped_steps: int


@dataclass(frozen=True)
class LoggingConfig(_FromFlags):
    run_name: str
    model_preset: str | None
    log_interval: int
    log_dir: str
    tensorboard_dir: str
    peak_tflops: float | None
    wandb_mode: str | None
    wandb_project: str
    wandb_entity: str | None
    wandb_group: str | None
    wandb_exp_name: str | None
    wandb_save_dir: str | None
    ignored_flags: tuple[str, ...]   # notes on accepted Megatron-LM flags without effect


@dataclass(frozen=True)
class ExecutionConfig(_FromFlags):
    seed: int
    deterministic_mode: bool
    cuda_graph_impl: str             # "none" | "local" (finalize_args resolves "auto")
    cuda_graph_warmup_steps: int
    dry_run: bool
    execution_notes: tuple[str, ...]  # fast paths asked for and not taken, and why (fast_path)

    @property
    def cuda_graph(self) -> bool:
        """Whether the run captures its iterations (--cuda-graph-impl local)."""
        return self.cuda_graph_impl == "local"


@dataclass(frozen=True)
class TrainingConfig:
    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    batch: BatchConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    fault_tolerance: FaultToleranceConfig
    logging: LoggingConfig
    execution: ExecutionConfig
    # The finalized command line as JSON data (arguments.resolved_config, vocabulary sizes
    # included): config.json, wandb's config, and Megatron-LM's `args` in checkpoints.
    flags: Mapping[str, Any]

    @classmethod
    def from_args(cls, args: argparse.Namespace, tokenizer_vocab_size: int) -> "TrainingConfig":
        """From finalize_args' result and the loaded tokenizer's vocabulary size."""
        from megatron_averis.training.arguments import resolved_config

        padded = padded_vocab_size(tokenizer_vocab_size, args.make_vocab_size_divisible_by,
                                   args.tensor_model_parallel_size)
        full = argparse.Namespace(**vars(args), tokenizer_vocab_size=tokenizer_vocab_size,
                                  padded_vocab_size=padded)
        return cls(**{name: section.from_args(full) for name, section in _SECTIONS.items()},
                   flags=MappingProxyType(resolved_config(full)))


_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "optimizer": OptimizerConfig,
             "schedule": ScheduleConfig, "batch": BatchConfig, "data": DataConfig,
             "checkpoint": CheckpointConfig, "fault_tolerance": FaultToleranceConfig,
             "logging": LoggingConfig, "execution": ExecutionConfig}


def field_flags() -> dict[str, str]:
    """flag (argparse dest) -> the section holding it, over every typed field."""
    out: dict[str, str] = {}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            if f.name in out:
                raise AssertionError(f"flag {f.name} is a field of both {out[f.name]} and {section}")
            out[f.name] = section
    return out


def folded_at_finalize() -> frozenset[str]:
    """The flags (argparse dests) without a field: finalize_args folds them into other fields."""
    from megatron_averis.training import megatron_flags
    from megatron_averis.training.arguments import ARCH_FLAGS

    return frozenset(ARCH_FLAGS) | megatron_flags.dests() | {
        # -> ModelConfig.arch / .recipe / .padded_vocab_size
        "untie_embeddings_and_output_weights", "make_vocab_size_divisible_by", "fp4_format",
        "fp4_recipe", "fp4_recipe_requested", "fp4_quantizer_factory", "fp4_recipe_override",
        "fp4_token_sum", "fp4_gemm",
        "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16",
        "recompute_activations",  # -> recompute_granularity
        # -> BatchConfig.train_iters and ScheduleConfig.lr_schedule_samples
        "train_samples", "lr_decay_iters", "lr_decay_samples", "lr_warmup_iters",
        "lr_warmup_samples", "lr_warmup_fraction", "lr_wsd_decay_iters", "lr_wsd_decay_samples",
        # one supported value each, checked by finalize_args
        "context_parallel_size", "ckpt_format", "cuda_graph_scope"}
