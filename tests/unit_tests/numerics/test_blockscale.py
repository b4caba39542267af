import math

import numpy as np
import pytest
import torch

import fp4_reference as ref
from megatron_averis.numerics import quantize_mxfp4, quantize_nvfp4


def _biased(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 1, cols).view(1, cols)
    x[:, 3] += 40.0  # an outlier column, as LLM activations have
    return x


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_nvfp4_matches_reference(device, block):
    x = _biased(32, 64)
    q = quantize_nvfp4(x.to(device), block)
    want, want_scales = ref.nvfp4(x.numpy(), block)
    np.testing.assert_array_equal(q.dequantize().cpu().double().numpy(), want)
    np.testing.assert_array_equal(q.block_scales.float().cpu().double().numpy(), want_scales)
    assert q.data.dtype == torch.uint8 and q.data.shape == (32, 32)
    assert q.block_scales.dtype == torch.float8_e4m3fn
    # the global decode scale is amax / (448 * 6) in FP32
    assert q.tensor_scale.item() == np.float32(1) / (np.float32(2688) / np.float32(x.abs().max()))


def test_nvfp4_scaled_values_exact_in_bf16(device):
    q = quantize_nvfp4(_biased(16, 128).to(device))
    v32 = q.scaled_values(torch.float32)
    assert torch.equal(q.scaled_values(torch.bfloat16).float(), v32)


def test_nvfp4_amax_override_and_edge_cases(device):
    # zeros: all-zero output, finite scales
    z = quantize_nvfp4(torch.zeros(2, 32, device=device))
    assert torch.equal(z.dequantize(), torch.zeros(2, 32, device=device))
    # a tiny block beside a huge one: its E4M3 scale underflows to 0 and it reads back as 0,
    # exactly as the reference (and the hardware format) does
    x = torch.zeros(1, 32)
    x[0, :16] = 1e4
    x[0, 16:] = 1e-6
    q = quantize_nvfp4(x.to(device))
    np.testing.assert_array_equal(q.dequantize().cpu().double().numpy(), ref.nvfp4(x.numpy())[0])
    assert q.dequantize()[0, 16:].abs().max().item() == 0
    # huge values: no overflow, amax maps to 6 * 448
    big = torch.full((1, 16), 3e38)
    np.testing.assert_allclose(quantize_nvfp4(big.to(device)).dequantize().cpu().numpy(), big.numpy(), rtol=1e-6)
    # subnormal E4M3 block scales are used for small blocks
    y = _biased(4, 64, 1)
    y[:, 16:32] *= 1e-4
    np.testing.assert_array_equal(quantize_nvfp4(y.to(device)).dequantize().cpu().double().numpy(), ref.nvfp4(y.numpy())[0])
    # a passed-in amax (tensor parallel) is used instead of the local one
    amax = torch.tensor(100.0, device=device)
    np.testing.assert_array_equal(
        quantize_nvfp4(y.to(device), amax=amax).dequantize().cpu().double().numpy(),
        ref.nvfp4(y.numpy(), amax=100.0)[0],
    )


def test_nvfp4_non_finite_is_nan_everywhere(device):
    for bad in (float("inf"), float("nan")):
        x = torch.randn(2, 32)
        x[1, 5] = bad
        d = quantize_nvfp4(x.to(device)).dequantize()
        assert torch.isnan(d).all(), "documented: a non-finite input poisons the whole tensor"


def test_nvfp4_shape_errors():
    with pytest.raises(ValueError, match="not divisible by the 1x16 block"):
        quantize_nvfp4(torch.randn(4, 24))
    with pytest.raises(ValueError, match="not divisible by the 16x16 block"):
        quantize_nvfp4(torch.randn(8, 32), (16, 16))
    with pytest.raises(ValueError, match="1x16 or 16x16"):
        quantize_nvfp4(torch.randn(8, 32), (1, 32))


def test_2d_blocks_give_w_and_wt_the_same_values(device):
    w = _biased(48, 64, 2)
    qw = quantize_nvfp4(w.to(device), (16, 16))
    qwt = quantize_nvfp4(w.t().contiguous().to(device), (16, 16))
    assert torch.equal(qw.dequantize().t(), qwt.dequantize())
    assert torch.equal(qw.t().dequantize(), qwt.dequantize())
    with pytest.raises(ValueError, match="cannot be transposed"):
        quantize_nvfp4(w.to(device)).t()


@pytest.mark.parametrize("outputs", [{}, {"values": torch.bfloat16}, {"values": torch.bfloat16, "payload": False}])
def test_transpose_is_a_view_with_the_payload_built_on_demand(device, outputs):
    """Wᵀ of a 16x16 W: its values are W's values transposed without a copy, and its payload,
    built only when read, equals an independent quantization of the transposed matrix."""
    w = _biased(48, 64, 5).to(device)
    qw = quantize_nvfp4(w, (16, 16), **outputs)
    ref = quantize_nvfp4(w.t().contiguous(), (16, 16))
    qt = qw.t()
    assert qt.shape == (64, 48) and qt.t() is qw
    values = qt.scaled_values()
    assert torch.equal(values, ref.scaled_values())
    assert values.stride() == (1, 64)  # the transpose of W's [48, 64] values: no copy
    assert qt._payload is None  # nothing byte-wise ran for the values
    assert qt.has_payload == qw.has_payload  # (the CPU reference always keeps the payload)
    if qt.has_payload:
        data, scales, tensor_scale = qt.packed()
        assert torch.equal(data, ref.data) and torch.equal(tensor_scale, ref.tensor_scale)
        assert torch.equal(scales.view(torch.uint8), ref.block_scales.view(torch.uint8))
        assert torch.equal(qt.dequantize(), ref.dequantize())
    else:
        assert qt.data is None and qt.block_scales is None
        with pytest.raises(ValueError, match="quantized for its GEMM only"):
            qt.packed()


def test_mxfp4_matches_ocp_rule(device):
    x = _biased(8, 96, 3)
    x[0, :32] = 0.0  # zero block
    x[1, 32:64] = torch.linspace(-6, 6, 32) * 2.0**-130  # block near the smallest scale
    x[2, :32] = 2.0**10  # exact power of two amax
    q = quantize_mxfp4(x.to(device))
    np.testing.assert_array_equal(q.dequantize().cpu().double().numpy(), ref.mxfp4(x.numpy()))
    exps = q.block_scales.cpu().numpy().astype(int) - 127
    for r in range(8):
        for b in range(3):
            amax = float(x[r, b * 32:(b + 1) * 32].abs().max())
            want = -127 if amax == 0 else max(math.floor(math.log2(amax)) - 2, -127)
            assert exps[r, b] == want


def test_mxfp4_non_finite_block_is_nan(device):
    x = torch.randn(2, 64)
    x[0, 40] = float("inf")
    d = quantize_mxfp4(x.to(device)).dequantize()
    assert torch.isnan(d[0, 32:]).all() and torch.isfinite(d[0, :32]).all() and torch.isfinite(d[1]).all()
    assert int(quantize_mxfp4(x.to(device)).block_scales[0, 1]) == 0xFF
