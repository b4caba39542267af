"""megatron-core's ColumnParallelLinear / RowParallelLinear running their GEMMs under a recipe.

Same constructor and forward contract as the parents, plus `recipe` (None or a BF16 recipe: the
parent's code path, unchanged) and `gather_quantized` (under sequence parallelism, all-gather FP4
payloads rather than BF16 tensors). The FP4 path is linear.function's autograd function, which
owns every TP/SP collective of the layer.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_averis.linear.comm import TPComm
from megatron_averis.linear.function import LinearContext, quantized_linear
from megatron_averis.linear.module import next_stream_id
from megatron_averis.recipes import Recipe, check_linear_shape

# Stream ids are counted per process in construction order; pipeline stages build different
# layers, so their ranges are kept apart.
_STAGE_STRIDE = 1 << 20


def _stream_id() -> int:
    stage = 0
    if parallel_state.model_parallel_is_initialized():
        stage = parallel_state.get_pipeline_model_parallel_rank()
    return stage * _STAGE_STRIDE + next_stream_id()


def _replica_id() -> int:
    """Data- and context-parallel rank: each replica gets its own stochastic-rounding bits."""
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def _fp4(recipe: Recipe | None) -> bool:
    return recipe is not None and not recipe.is_bf16


def _config_without_apex_fusion(config, recipe):
    """FP4 layers accumulate their FP32 wgrad into main_grad themselves, so Megatron's
    gradient-accumulation fusion does not need apex's fused kernel here; the parent
    constructor would refuse it without apex, so it sees the flag off."""
    if _fp4(recipe) and config.gradient_accumulation_fusion:
        return dataclasses.replace(config, gradient_accumulation_fusion=False)
    return config


class _RecipeMixin:
    def _setup_recipe(self, recipe, config, mode, in_local, out_local, gather_quantized, stride=1):
        self.recipe = recipe
        self.config = config
        self.gradient_accumulation_fusion = config.gradient_accumulation_fusion
        self.linear_ctx = None
        if not _fp4(recipe):
            return
        if self.is_expert:
            raise ValueError(
                "FP4 recipes are not wired for MoE expert layers; use recipe=None (BF16) for experts"
            )
        check_linear_shape(recipe, in_local, out_local,
                           f"{type(self).__name__}({in_local}->{out_local} per TP rank)")
        self.linear_ctx = LinearContext(
            recipe=recipe,
            mode=mode,
            comm=TPComm(self.tp_group),
            sequence_parallel=self.sequence_parallel,
            gather_quantized=gather_quantized,
            # FP32 dW straight into main_grad wherever DDP gives one, whatever
            # gradient_accumulation_fusion says (that flag asks apex's kernel of BF16 layers).
            accumulate_main_grad=True,
            out_stride=stride,
            stream_id=_stream_id(),
            replica_id=_replica_id(),
        )


class AverisColumnParallelLinear(_RecipeMixin, ColumnParallelLinear):
    def __init__(self, input_size, output_size, *, config, init_method,
                 recipe: Recipe | None = None, gather_quantized: bool = True, **kwargs):
        super().__init__(input_size, output_size, config=_config_without_apex_fusion(config, recipe),
                         init_method=init_method, **kwargs)
        self._setup_recipe(recipe, config, "column", input_size, self.output_size_per_partition,
                           gather_quantized, stride=kwargs.get("stride", 1))

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.linear_ctx is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        return quantized_linear(input, weight, kwargs.get("bias"), self.linear_ctx)


class AverisRowParallelLinear(_RecipeMixin, RowParallelLinear):
    def __init__(self, input_size, output_size, *, config, init_method,
                 recipe: Recipe | None = None, gather_quantized: bool = True, **kwargs):
        super().__init__(input_size, output_size, config=_config_without_apex_fusion(config, recipe),
                         init_method=init_method, **kwargs)
        self._setup_recipe(recipe, config, "row", self.input_size_per_partition, output_size,
                           gather_quantized)

    def forward(self, input_):
        if self.linear_ctx is None:
            return super().forward(input_)
        if not self.input_is_parallel:
            raise ValueError("FP4 row-parallel layers expect input_is_parallel=True (as in GPT layers)")
        # The reduce-scatter / all-reduce of the output is inside the function, so that backward
        # can quantize the output gradient shard with group-wide statistics before gathering it.
        output = quantized_linear(input_, self.weight, None, self.linear_ctx)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None
