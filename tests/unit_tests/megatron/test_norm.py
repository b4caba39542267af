"""RMSNorm against the float64 formula x / sqrt(mean(x²) + eps) · w."""

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_averis.megatron.norm import RMSNorm


def make_config(**kw):
    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, normalization="RMSNorm",
                use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def reference(x, w, eps):
    x, w = x.double(), w.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("shape", [(7, 3, 48), (5, 2, 4, 16)])  # [s, b, h] and q/k-norm [s, b, heads, d]
def test_forward_and_backward_match_float64(shape):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(make_config(), hidden_size=shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    y = norm(x)
    xr, wr = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    ref = reference(xr, wr, 1e-6)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    y.backward(grad.float())
    ref.backward(grad)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad.double(), wr.grad, rtol=1e-5, atol=1e-5)


def test_bf16_input_rounds_once():
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(make_config(params_dtype=torch.bfloat16), hidden_size=64, eps=1e-5)
    assert norm.weight.dtype == torch.bfloat16
    x = (torch.randn(16, 64, generator=g) * 10).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = reference(x, norm.weight, 1e-5)
    # FP32 statistics: only the final rounding to BF16 (unit roundoff 2^-8) remains
    assert ((y.double() - ref).abs() <= ref.abs() * 2.0**-8 + 1e-30).all()


def test_eps_comes_from_the_constructor():
    x = torch.full((2, 8), 1e-3)
    y = RMSNorm(make_config(), hidden_size=8, eps=1e-4)(x)
    torch.testing.assert_close(y.double(), reference(x, torch.ones(8), 1e-4))


def test_zero_centered_gamma_stores_w_minus_one():
    norm = RMSNorm(make_config(layernorm_zero_centered_gamma=True), hidden_size=8, eps=1e-6)
    assert torch.equal(norm.weight, torch.zeros(8))
    with torch.no_grad():
        norm.weight.fill_(0.5)
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x).double(), reference(x, torch.full((8,), 1.5), 1e-6))


@pytest.mark.parametrize("sp", [False, True])
def test_weight_marks_sequence_parallel_for_grad_allreduce(sp):
    config = make_config(tensor_model_parallel_size=2, sequence_parallel=sp)
    assert RMSNorm(config, hidden_size=8).weight.sequence_parallel is sp


def test_refuses_layernorm_config():
    with pytest.raises(ValueError, match="normalization='RMSNorm'"):
        RMSNorm(make_config(normalization="LayerNorm"), hidden_size=8)
