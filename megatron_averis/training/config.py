"""The typed configuration the model is built from.

`ModelConfig` holds everything that decides this rank's GPTModel: architecture, recipe, precision,
padded vocabulary, parallel layout and recomputation. It is made once, from the finalized command
line (`from_args`, after the tokenizer has sized the vocabulary) or from a checkpoint's saved
configuration (diagnostics.checkpoint), and training/model.py builds from it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megatron_averis.recipes import Recipe
from megatron_averis.training.presets import ModelArch


@dataclass(frozen=True)
class ModelConfig:
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

    @classmethod
    def from_args(cls, args) -> "ModelConfig":
        """From finalize_args' result once args.padded_vocab_size is set."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @property
    def uses_te(self) -> bool:
        return self.transformer_impl == "transformer_engine"
