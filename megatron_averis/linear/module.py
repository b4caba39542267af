"""nn.Module wrapper of the quantized linear for one device."""

from __future__ import annotations

import itertools
import math

import torch

from megatron_averis.linear.function import LinearContext, quantized_linear
from megatron_averis.recipes import Recipe, check_linear_shape, get_recipe

# Default stochastic-rounding stream ids, in construction order (identical on every rank that
# builds the same model).
_stream_ids = itertools.count()


def next_stream_id() -> int:
    return next(_stream_ids)


def reset_stream_ids() -> None:
    """Number the next model's linears from 0 again: a model's SR streams then depend on its
    structure only, not on what the process built before (e.g. a benchmark's earlier models)."""
    global _stream_ids
    _stream_ids = itertools.count()


class QuantizedLinear(torch.nn.Module):
    """y = x·Wᵀ + b with the GEMMs of `recipe`; x is [s, b, in] or [n, in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 recipe: Recipe | str = "bf16", device=None, dtype=torch.bfloat16,
                 stream_id: int | None = None):
        super().__init__()
        recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
        check_linear_shape(recipe, in_features, out_features, f"QuantizedLinear({in_features}->{out_features})")
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
                     if bias else None)
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        sid = next_stream_id() if stream_id is None else stream_id
        self.ctx = LinearContext(recipe=recipe, stream_id=sid)

    @property
    def recipe(self) -> Recipe:
        return self.ctx.recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias, self.ctx)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe.name}")
