"""One call from (TransformerConfig, Recipe) to megatron-core's GPTModel with Averis layers."""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_averis.megatron import cpu_compat
from megatron_averis.megatron.layer_specs import LinearClasses, averis_decoder_block_spec
from megatron_averis.recipes import Recipe


def build_gpt_model(config: TransformerConfig, recipe: Recipe, *, vocab_size: int, max_seq_len: int,
                    qk_layernorm: bool, rotary_base: int | float,
                    share_embeddings_and_output_weights: bool, pre_process: bool = True,
                    post_process: bool = True, vp_stage: int | None = None,
                    linear_classes: LinearClasses | None = None) -> GPTModel:
    """GPTModel for this pipeline (and virtual pipeline) stage, with RoPE.

    Embedding and output layer are GPTModel's own (BF16); transformer layers come from
    averis_decoder_block_spec. The output stays split over TP ranks (parallel_output=True), as
    mcore's vocab-parallel cross entropy expects. vocab_size must already be padded to a multiple
    of the TP size. linear_classes overrides the (column, row) linear classes (tests, baselines).
    """
    if not torch.cuda.is_available():
        if not config.use_cpu_initialization:
            raise ValueError("CUDA is not available: set TransformerConfig(use_cpu_initialization="
                             "True) to build the model on the CPU")
        cpu_compat.install()
    if vocab_size % config.tensor_model_parallel_size:
        raise ValueError(f"vocab_size={vocab_size} is not divisible by tensor_model_parallel_size="
                         f"{config.tensor_model_parallel_size}; pad the vocabulary first")
    spec = averis_decoder_block_spec(config, recipe, qk_layernorm=qk_layernorm, vp_stage=vp_stage,
                                     linear_classes=linear_classes)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
