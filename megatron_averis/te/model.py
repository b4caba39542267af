"""The trainer's --transformer-impl transformer_engine: megatron-core's TE GPT layers under the
Averis CustomRecipe.

megatron-core builds its TE spec (TELayerNormColumnParallelLinear for linear_qkv / linear_fc1
with the RMSNorm fused in, TERowParallelLinear, TEDotProductAttention, TENorm for the q/k norms)
and enters the recipe itself: TransformerBlock wraps each layer in `get_fp4_context`, which with
`fp4_recipe="custom"` builds TE's CustomRecipe from the factory path in the config and skips the
BF16 edge layers. We only put our recipe behind that path (factories.configure) and fill the
config fields.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_averis.recipes import Recipe, get_recipe

FACTORY_PATH = "megatron_averis.te.factories.configured"
# Transformer Engine's Python reference of NVFP4BlockScaling, as a CustomRecipe factory: the
# te-nvfp4 route with the hardware swapped for the reference (te_nvfp4_backend="reference"), so
# that the dispatch runs on GPUs without FP4 tensor cores (its GPU test on Hopper).
TE_NVFP4_REFERENCE = ("transformer_engine.pytorch.custom_recipes.reference_nvfp4."
                      "nvfp4_ref_rht_2d_factory")
TE_NVFP4_BACKENDS = ("native", "reference")


def is_nvidia_recipe(recipe: Recipe) -> bool:
    """`recipe` is the `nvfp4` preset (NVIDIA's recipe), up to the fields that do not change its
    definition: BF16 edge layers, the GEMM path, the token-sum order (it has no means) and the
    seeds of its random streams (under NVFP4BlockScaling they are Transformer Engine's)."""
    keep = dict(bf16_first_layers=0, bf16_last_layers=0, fp4_gemm="dequant", token_sum="torch",
                sr_seed=0, rht_seed=0)
    preset = get_recipe("nvfp4")
    return dataclasses.replace(recipe, name=preset.name, **keep) == dataclasses.replace(preset, **keep)


def runs_te_nvfp4(recipe: Recipe, device: torch.device | str | None) -> bool:
    """The dispatch for Blackwell: `nvfp4` runs as Transformer Engine's own NVFP4BlockScaling
    (TE's quantization kernels and FP4 GEMMs) when its fp4_gemm lets the hardware run (auto or
    native) and `device` has FP4 tensor cores with TE's NVFP4 support. Every other FP4 recipe runs
    our CustomRecipe, whose residual GEMMs go native under the same conditions (native.py)."""
    from megatron_averis.te import native

    if device is None or recipe.fp4_gemm not in ("auto", "native") or not is_nvidia_recipe(recipe):
        return False
    return native.hardware_fp4(torch.device(device))


def te_config_fields(recipe: Recipe, device: torch.device | str | None = None, *,
                     te_nvfp4_backend: str = "native") -> dict:
    """TransformerConfig fields that make megatron-core run `recipe` through TE on `device`
    (none: BF16): TE's NVFP4BlockScaling where runs_te_nvfp4 (te_nvfp4_backend "reference": TE's
    Python reference of it), else the Averis CustomRecipe."""
    if te_nvfp4_backend not in TE_NVFP4_BACKENDS:
        raise ValueError(f"te_nvfp4_backend={te_nvfp4_backend!r}; choose one of {TE_NVFP4_BACKENDS}")
    if recipe.is_bf16:
        return {}
    if runs_te_nvfp4(recipe, device):
        fields = (dict(fp4="e2m1", fp4_recipe="nvfp4") if te_nvfp4_backend == "native" else
                  dict(fp4="e2m1", fp4_recipe="custom", fp4_quantizer_factory=TE_NVFP4_REFERENCE))
    else:
        fields = dict(fp4="e2m1", fp4_recipe="custom", fp4_quantizer_factory=FACTORY_PATH)
    if recipe.bf16_first_layers or recipe.bf16_last_layers:
        fields.update(first_last_layers_bf16=True,
                      num_layers_at_start_in_bf16=recipe.bf16_first_layers,
                      num_layers_at_end_in_bf16=recipe.bf16_last_layers)
    return fields


def config_runs_te_nvfp4(config) -> bool:
    """Whether a TransformerConfig selects TE's NVFP4BlockScaling (native or its reference).
    megatron-core's fp4_recipe defaults to "nvfp4" with fp4 unset (BF16), so fp4 is looked at first."""
    return bool(getattr(config, "fp4", None)) and (
        getattr(config, "fp4_recipe", None) == "nvfp4"
        or getattr(config, "fp4_quantizer_factory", None) == TE_NVFP4_REFERENCE)


def build_te_gpt_model(config, recipe: Recipe, *, vocab_size: int, max_seq_len: int,
                       qk_layernorm: bool, rotary_base, share_embeddings_and_output_weights: bool,
                       pre_process: bool = True, post_process: bool = True,
                       vp_stage: int | None = None):
    """GPTModel with megatron-core's TE layer spec, its GEMMs under `recipe`."""
    from megatron_averis.te.availability import require_te

    require_te()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_averis.te import factories

    te_nvfp4 = config_runs_te_nvfp4(config)
    if te_nvfp4 and not is_nvidia_recipe(recipe):
        raise ValueError(f"the config runs Transformer Engine's NVFP4BlockScaling, which is the "
                         f"nvfp4 preset, not {recipe.name!r}; build the config with "
                         "te_config_fields(recipe, device)")
    routing = ("fp4_recipe", "fp4_quantizer_factory")  # which TE recipe: checked just above
    expected = {k: v for k, v in te_config_fields(recipe).items()
                if not (te_nvfp4 and k in routing)}
    if any(getattr(config, k) != v for k, v in expected.items()) or (recipe.is_bf16 and config.fp4):
        raise ValueError(f"the TransformerConfig does not select recipe {recipe.name!r} for TE; "
                         "build it with te_config_fields(recipe, device)")
    if config.gradient_accumulation_fusion and not recipe.is_bf16 and config.fp4_recipe == "custom":
        raise ValueError("TE hands custom-recipe GEMMs no main_grad buffer; set "
                         "gradient_accumulation_fusion=False")
    factories.configure(recipe)
    spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                    max_sequence_length=max_seq_len, pre_process=pre_process,
                    post_process=post_process, parallel_output=True,
                    share_embeddings_and_output_weights=share_embeddings_and_output_weights,
                    position_embedding_type="rope", rotary_base=rotary_base, vp_stage=vp_stage)
