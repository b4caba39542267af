"""TransformerConfig from the command line, and this rank's GPTModel: our Averis spec
(--transformer-impl local) or megatron-core's TE spec under the recipe as a TE CustomRecipe
(--transformer-impl transformer_engine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_averis.linear.module import reset_stream_ids
from megatron_averis.megatron.model import build_gpt_model
from megatron_averis.te.model import build_te_gpt_model, te_config_fields
from megatron_averis.training.config import ModelConfig


def transformer_config(cfg: ModelConfig, device: torch.device) -> TransformerConfig:
    a = cfg.arch
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    on_gpu = device.type == "cuda"
    return TransformerConfig(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups,
        kv_channels=a.kv_channels,
        qk_layernorm=a.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=a.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=a.hidden_dropout,
        attention_dropout=a.attention_dropout,
        init_method_std=a.init_method_std,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.bf16,
        # Loss = sum over tokens / tokens in the global batch, whatever the micro-batching.
        calculate_per_token_loss=True,
        # Without CUDA, weights are initialised on the CPU from torch's generator.
        use_cpu_initialization=not on_gpu,
        # megatron-core's jit-fused bias-dropout-add; SwiGLU, RoPE and cross entropy: fusions.py.
        bias_dropout_fusion=on_gpu,
        **cfg.fusions.config_fields(on_gpu=on_gpu, bf16=cfg.bf16),
        # apex's fused weight-gradient kernel is not required: FP4 linears accumulate into
        # main_grad themselves and BF16 ones go through the DDP hook.
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        deallocate_pipeline_outputs=True,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        **(te_config_fields(cfg.recipe, device) if cfg.uses_te else {}),
    )


def build_model(cfg: ModelConfig, config: TransformerConfig,
                device: torch.device) -> list[torch.nn.Module]:
    """This pipeline stage's model chunk (a list, as megatron-core's schedules expect)."""
    build = build_te_gpt_model if cfg.uses_te else build_gpt_model
    reset_stream_ids()  # SR streams numbered by position in this model (linear.module)
    model = build(
        config,
        cfg.recipe,
        vocab_size=cfg.padded_vocab_size,
        max_seq_len=cfg.arch.max_position_embeddings,
        qk_layernorm=cfg.arch.qk_layernorm,
        rotary_base=cfg.arch.rotary_base,
        share_embeddings_and_output_weights=cfg.arch.tie_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    model.to(device)
    return [model]


def count_local_parameters(model_chunks) -> int:
    """Parameters this rank holds (a tied output layer on the last stage counts once more)."""
    return sum(p.numel() for m in model_chunks for p in m.parameters())
