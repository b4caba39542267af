"""dgrad's Wᵀ of a 16x16-block weight is a view of W's quantization: the linear transposes the
packed payload neither in forward nor in backward (no byte-wise pass over W) and saves W's own
payload. That the view's values equal an independent quantization of Wᵀ is tested in
numerics/test_blockscale.py, and that dX equals the GEMM with that operand bit for bit in
test_saved_activations.py."""

import pytest
import torch

from megatron_averis.linear.module import QuantizedLinear
from megatron_averis.numerics import blockscale

SHARED_WEIGHT = ["nvfp4", "nvfp4-nohadamard", "averis", "averis-rht"]  # 16x16 W, no RHT on W


@pytest.mark.parametrize("recipe", SHARED_WEIGHT)
def test_linear_reads_w_transposed_as_a_view(monkeypatch, recipe):
    views = []

    def refuse(self):
        raise AssertionError("the transposed payload of W was built")

    real = blockscale.TransposedQuantizedTensor.scaled_values

    def counted(self, dtype=torch.bfloat16):
        views.append(tuple(self.shape))
        return real(self, dtype)

    monkeypatch.setattr(blockscale.TransposedQuantizedTensor, "_transposed_payload", refuse)
    monkeypatch.setattr(blockscale.TransposedQuantizedTensor, "scaled_values", counted)
    torch.manual_seed(0)
    t, k, n = 64, 64, 96
    lin = QuantizedLinear(k, n, bias=False, recipe=recipe)
    x = torch.randn(t, k, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(t, n, dtype=torch.bfloat16)
    lin(x).backward(g)
    assert (k, n) in views  # dgrad read Wᵀ [K, N] through the view

