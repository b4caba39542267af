"""GPT layer specs for megatron-core 0.16.1 with Averis linears, SDPA attention and RMSNorm.

Pre-norm decoder layer, as Llama / Qwen3:
    x + proj(attn(qk_norm(rope(qkv(rmsnorm(x))))))  then  x + fc2(act(fc1(rmsnorm(x))))
mcore's own SelfAttention, MLP and TransformerLayer do the wiring; the spec only chooses the
modules: AverisColumnParallelLinear (linear_qkv, linear_fc1), AverisRowParallelLinear
(linear_proj, linear_fc2), SDPACoreAttention, and RMSNorm (also the q/k norms with
qk_layernorm=True). SwiGLU comes from the config (gated_linear_unit=True, activation_func=silu),
RoPE from GPTModel (position_embedding_type="rope").

Layers are numbered over the whole model: the first recipe.bf16_first_layers and the last
recipe.bf16_last_layers run the BF16 recipe (Megatron-LM's --first-last-layers-bf16), whatever
pipeline stage builds them.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_averis.megatron.attention import SDPACoreAttention
from megatron_averis.megatron.norm import RMSNorm
from megatron_averis.recipes import Recipe, get_recipe

LinearClasses = tuple[type, type]  # (column-parallel class, row-parallel class)


def default_linear_classes() -> LinearClasses:
    # Imported on use: the FP4 linear stack is only needed once a model is built.
    from megatron_averis.megatron.parallel_linear import (
        AverisColumnParallelLinear,
        AverisRowParallelLinear,
    )

    return AverisColumnParallelLinear, AverisRowParallelLinear


class QKNormFromConfig:
    """The q/k norm that config.qk_layernorm asks for (RMSNorm or none), for specs built before
    the config is known (Megatron-LM's --spec). A class, since megatron-core's build_module
    returns plain functions unbuilt."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        if config.qk_layernorm:
            return RMSNorm(config=config, hidden_size=hidden_size, eps=eps)
        return IdentityOp()


def averis_layer_spec(recipe: Recipe, qk_layernorm: bool | None, *,
                      linear_classes: LinearClasses | None = None) -> ModuleSpec:
    """One decoder layer whose four linears run `recipe`.

    qk_layernorm: RMSNorm on queries and keys, or None to follow config.qk_layernorm.
    linear_classes: (column, row) classes taking the `recipe` keyword; default the Averis ones.
    """
    col, row = linear_classes or default_linear_classes()

    def linear(cls):
        return ModuleSpec(module=cls, params={"recipe": recipe})

    qk_norm = (QKNormFromConfig if qk_layernorm is None
               else RMSNorm if qk_layernorm else IdentityOp)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear(col),
                    core_attention=SDPACoreAttention,
                    linear_proj=linear(row),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=linear(col), linear_fc2=linear(row)),
            ),
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys of megatron-core's TE spec (the norms fused into the next linear),
            # as its local spec maps them: checkpoints load across the two and Megatron-LM.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def stage_layer_ids(config: TransformerConfig, vp_stage: int | None = None,
                    pp_rank: int | None = None) -> list[int]:
    """0-based indices, in the whole model, of the decoder layers this (virtual) stage builds.

    pp_rank=None means this process's pipeline rank (from megatron.core.parallel_state).
    """
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        return list(layout.get_layer_id_list(layer_type=LayerType.decoder,
                                             vp_stage=vp_stage, pp_rank=pp_rank))
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage,
                                                                pp_rank=pp_rank)))


def is_bf16_layer(layer_id: int, num_layers: int, recipe: Recipe) -> bool:
    """Whether 0-based layer `layer_id` of `num_layers` is one of the BF16 edge layers."""
    return layer_id < recipe.bf16_first_layers or layer_id >= num_layers - recipe.bf16_last_layers


def averis_decoder_block_spec(config: TransformerConfig, recipe: Recipe, *, qk_layernorm: bool,
                              vp_stage: int | None = None, pp_rank: int | None = None,
                              linear_classes: LinearClasses | None = None
                              ) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage (BF16 at the model's edges, `recipe` elsewhere) and
    the final RMSNorm, for GPTModel(transformer_layer_spec=...)."""
    check_config(config, qk_layernorm)
    bf16 = get_recipe("bf16")
    specs = {
        False: averis_layer_spec(recipe, qk_layernorm, linear_classes=linear_classes),
        True: averis_layer_spec(bf16, qk_layernorm, linear_classes=linear_classes),
    }
    layer_specs = [specs[is_bf16_layer(i, config.num_layers, recipe)]
                   for i in stage_layer_ids(config, vp_stage=vp_stage, pp_rank=pp_rank)]
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=RMSNorm)


def check_config(config: TransformerConfig, qk_layernorm: bool) -> None:
    """Raise, naming the fix, for configurations these specs do not build correctly."""
    if config.normalization != "RMSNorm":
        raise ValueError(f"Averis GPT layers use RMSNorm; set normalization='RMSNorm' "
                         f"(got {config.normalization!r})")
    if bool(config.qk_layernorm) != bool(qk_layernorm):
        # finalize_model_grads all-reduces q/k-norm gradients over TP only when the config says so.
        raise ValueError(f"qk_layernorm={qk_layernorm} but config.qk_layernorm={config.qk_layernorm}; "
                         "set TransformerConfig(qk_layernorm=...) to the same value")
    for flag, why in (("multi_latent_attention", "multi-latent attention"),
                      ("num_moe_experts", "mixture-of-experts layers"),
                      ("mtp_num_layers", "multi-token prediction"),
                      ("heterogeneous_block_specs", "heterogeneous block specs")):
        if getattr(config, flag):
            raise ValueError(f"the Averis GPT spec builds dense attention/MLP layers, not {why}; "
                             f"unset {flag}")
    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    tp = config.tensor_model_parallel_size
    if heads % groups:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}; "
                         "each key/value group must serve a whole number of query heads")
    if heads % tp:
        raise ValueError(f"num_attention_heads={heads} is not divisible by "
                         f"tensor_model_parallel_size={tp}; change either")
    if groups % tp and tp % groups:
        raise ValueError(f"num_query_groups={groups} and tensor_model_parallel_size={tp}: one must "
                         "divide the other (groups split over TP ranks, or ranks sharing a group)")
    if config.ffn_hidden_size % tp:
        raise ValueError(f"ffn_hidden_size={config.ffn_hidden_size} is not divisible by "
                         f"tensor_model_parallel_size={tp}")
