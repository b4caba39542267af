"""megatron-core integration: GPT layer specs and model builder for the Averis FP4 recipe.

No Transformer Engine or apex needed: attention is PyTorch SDPA, norms are torch RMSNorm.
"""

from megatron_averis.megatron.attention import SDPACoreAttention
from megatron_averis.megatron.layer_specs import (
    averis_decoder_block_spec,
    averis_layer_spec,
    check_config,
    default_linear_classes,
    is_bf16_layer,
    stage_layer_ids,
)
from megatron_averis.megatron.model import build_gpt_model
from megatron_averis.megatron.norm import RMSNorm

__all__ = [
    "SDPACoreAttention",
    "RMSNorm",
    "averis_decoder_block_spec",
    "averis_layer_spec",
    "build_gpt_model",
    "check_config",
    "default_linear_classes",
    "is_bf16_layer",
    "stage_layer_ids",
]
