"""Layer / block specs: modules chosen, recipes per layer (BF16 at the model's edges), errors."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_averis.megatron import (
    RMSNorm,
    SDPACoreAttention,
    averis_decoder_block_spec,
    averis_layer_spec,
)
from megatron_averis.megatron.parallel_linear import (
    AverisColumnParallelLinear,
    AverisRowParallelLinear,
)
from megatron_averis.recipes import get_recipe

AVERIS = get_recipe("averis", ["bf16_first_layers=1", "bf16_last_layers=2"])


def make_config(num_layers=6, **kw):
    base = dict(num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
                activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def linears(layer_spec):
    attn = layer_spec.submodules.self_attention.submodules
    mlp = layer_spec.submodules.mlp.submodules
    return {"qkv": attn.linear_qkv, "proj": attn.linear_proj,
            "fc1": mlp.linear_fc1, "fc2": mlp.linear_fc2}


def layer_kinds(block):
    """'bf16' or 'fp4' per layer, after checking all four linears of a layer agree."""
    kinds = []
    for spec in block.layer_specs:
        recipes = {name: s.params["recipe"] for name, s in linears(spec).items()}
        assert len({r.name for r in recipes.values()}) == 1, recipes
        kinds.append("bf16" if next(iter(recipes.values())).is_bf16 else "fp4")
    return kinds


def test_layer_spec_modules():
    spec = averis_layer_spec(AVERIS, qk_layernorm=True)
    sub = spec.submodules
    assert sub.input_layernorm is RMSNorm and sub.pre_mlp_layernorm is RMSNorm
    attn = sub.self_attention.submodules
    assert attn.core_attention is SDPACoreAttention
    assert attn.q_layernorm is RMSNorm and attn.k_layernorm is RMSNorm
    classes = {name: s.module for name, s in linears(spec).items()}
    assert classes == {"qkv": AverisColumnParallelLinear, "proj": AverisRowParallelLinear,
                       "fc1": AverisColumnParallelLinear, "fc2": AverisRowParallelLinear}
    assert all(s.params == {"recipe": AVERIS} for s in linears(spec).values())
    plain = averis_layer_spec(AVERIS, qk_layernorm=False,
                              linear_classes=(ColumnParallelLinear, RowParallelLinear))
    attn = plain.submodules.self_attention.submodules
    assert attn.q_layernorm is IdentityOp and attn.k_layernorm is IdentityOp
    assert linears(plain)["qkv"].module is ColumnParallelLinear
    assert linears(plain)["fc2"].module is RowParallelLinear


def test_first_and_last_layers_are_bf16_without_pipeline(mcore_single_process):
    block = averis_decoder_block_spec(make_config(6), AVERIS, qk_layernorm=False)
    assert layer_kinds(block) == ["bf16", "fp4", "fp4", "fp4", "bf16", "bf16"]
    assert block.layer_norm is RMSNorm


def test_no_bf16_layers_by_default(mcore_single_process):
    block = averis_decoder_block_spec(make_config(3), get_recipe("averis"), qk_layernorm=False)
    assert layer_kinds(block) == ["fp4"] * 3


def test_overlapping_edges_make_every_layer_bf16(mcore_single_process):
    recipe = get_recipe("nvfp4-plain", ["bf16_first_layers=2", "bf16_last_layers=2"])
    assert layer_kinds(averis_decoder_block_spec(make_config(3), recipe, qk_layernorm=False)) == ["bf16"] * 3


# 8 layers over the whole model, bf16 = layers {0, 6, 7}.
@pytest.mark.parametrize("pp,vp,pp_rank,vp_stage,expected", [
    (2, None, 0, None, ["bf16", "fp4", "fp4", "fp4"]),          # layers 0-3
    (2, None, 1, None, ["fp4", "fp4", "bf16", "bf16"]),         # layers 4-7
    (4, None, 3, None, ["bf16", "bf16"]),                       # layers 6-7
    (4, None, 1, None, ["fp4", "fp4"]),                         # layers 2-3
    (2, 2, 0, 0, ["bf16", "fp4"]),                              # layers 0-1
    (2, 2, 0, 1, ["fp4", "fp4"]),                               # layers 4-5
    (2, 2, 1, 0, ["fp4", "fp4"]),                               # layers 2-3
    (2, 2, 1, 1, ["bf16", "bf16"]),                             # layers 6-7
])
def test_bf16_edges_follow_global_layer_numbers_under_pipeline(pp, vp, pp_rank, vp_stage, expected):
    config = make_config(8, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
                         pipeline_dtype=torch.bfloat16)
    block = averis_decoder_block_spec(config, AVERIS, qk_layernorm=False, vp_stage=vp_stage,
                                      pp_rank=pp_rank)
    assert layer_kinds(block) == expected


def test_uneven_first_and_last_pipeline_stages():
    # 8 layers on 3 stages: 1 | 5 | 2 -> stage 1 holds layers 1-5, stage 2 holds 6-7.
    config = make_config(8, pipeline_model_parallel_size=3, pipeline_dtype=torch.bfloat16,
                         num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=2)
    kinds = [layer_kinds(averis_decoder_block_spec(config, AVERIS, qk_layernorm=False, pp_rank=r))
             for r in range(3)]
    assert kinds == [["bf16"], ["fp4"] * 5, ["bf16", "bf16"]]


def test_custom_pipeline_layout():
    # 5 layers: stage 0 has the embedding and layer 0, stage 1 layers 1-4 and the loss.
    layout = [["embedding", "decoder"], ["decoder"] * 4 + ["loss"]]
    config = make_config(5, pipeline_model_parallel_size=2, pipeline_dtype=torch.bfloat16,
                         pipeline_model_parallel_layout=layout)
    kinds = [layer_kinds(averis_decoder_block_spec(config, AVERIS, qk_layernorm=False, pp_rank=r))
             for r in range(2)]
    assert kinds == [["bf16"], ["fp4", "fp4", "bf16", "bf16"]]


@pytest.mark.parametrize("overrides,qk,match", [
    (dict(normalization="LayerNorm"), False, "normalization='RMSNorm'"),
    (dict(qk_layernorm=False), True, "config.qk_layernorm=False"),
    (dict(num_attention_heads=6, num_query_groups=4), False, "not a multiple of num_query_groups"),
    (dict(num_moe_experts=4), False, "unset num_moe_experts"),
    (dict(tensor_model_parallel_size=2, ffn_hidden_size=127), False, "ffn_hidden_size=127"),
])
def test_config_errors_name_the_fix(mcore_single_process, overrides, qk, match):
    config = make_config(4, **overrides)
    with pytest.raises(ValueError, match=match):
        averis_decoder_block_spec(config, AVERIS, qk_layernorm=qk)


def test_heads_not_divisible_by_tp_is_refused():
    # TransformerConfig refuses this itself; a config changed after construction is caught here.
    config = make_config(4)
    config.tensor_model_parallel_size = 3
    with pytest.raises(ValueError, match="not divisible by tensor_model_parallel_size=3"):
        averis_decoder_block_spec(config, AVERIS, qk_layernorm=False, pp_rank=0)
