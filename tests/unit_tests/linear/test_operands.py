"""The public per-role quantizer (linear.operands): bad input, and the call pattern does not
change the bits (a wgrad operand built alone equals the one built beside its fprop operand)."""

import pytest
import torch

from megatron_averis.linear import LinearContext
from megatron_averis.linear.operands import quantize_role, quantize_tensor
from megatron_averis.recipes import get_recipe


def _ctx(name="averis"):
    return LinearContext(recipe=get_recipe(name, ["inputs.rounding=stochastic"]), stream_id=4)


def test_bad_input_is_named():
    x = torch.randn(32, 64)
    with pytest.raises(ValueError, match="unknown tensor 'activation'"):
        quantize_tensor(_ctx(), "activation", x, row_call=1)
    with pytest.raises(ValueError, match="rowwise operand, the columnwise one, or both"):
        quantize_tensor(_ctx(), "input", x, rowwise=False, columnwise=False, row_call=1)
    with pytest.raises(ValueError, match="quantize_tensor\\(ctx, 'weight'"):
        quantize_role(_ctx(), "fprop_weight", x, 1)


@pytest.mark.parametrize("name", ["averis", "averis-rht", "nvfp4", "nvfp4-plain", "mxfp4"])
@pytest.mark.parametrize("tensor,role", [("input", "wgrad_input"), ("grad_output", "wgrad_grad")])
def test_columnwise_alone_equals_columnwise_beside_rowwise(name, tensor, role):
    """μ̂ and the amax reused from the rowwise operand equal those computed afresh, so TE's
    split usage pattern and QuantizedLinear's joint one give the same operand."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(96, 64, generator=g) * 2 + torch.randn(64, generator=g) * 3).bfloat16()
    both = quantize_tensor(_ctx(name), tensor, x, row_call=2).columnwise
    alone = quantize_role(_ctx(name), role, x, 2)
    assert alone.shape == (64, 96) and alone.transposed
    assert torch.equal(alone.qt.data, both.qt.data)
    assert torch.equal(alone.qt.block_scales.view(torch.uint8), both.qt.block_scales.view(torch.uint8))
    assert torch.equal(alone.qt.tensor_scale, both.qt.tensor_scale)
    assert (alone.mean is None) == (both.mean is None)
    if alone.mean is not None:
        assert torch.equal(alone.mean, both.mean)
