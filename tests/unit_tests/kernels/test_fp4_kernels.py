"""Triton FP4 kernels against the PyTorch reference: identical codes, scales, tensor scales, means."""

import numpy as np
import pytest
import torch

from megatron_averis.linear import QuantizedLinear
from megatron_averis.numerics import (
    QuantizedTensor,
    blockwise_rht,
    quantize_mxfp4,
    quantize_nvfp4,
    quantize_operand,
    random_signs,
)
from megatron_averis.numerics import backend
from megatron_averis.numerics.backend import TOKEN_SUMS
from megatron_averis.numerics.blockscale import abs_max
from megatron_averis.numerics.random import StepSeed, mix_seed, seed_key
from megatron_averis.numerics.operand import pairwise_sum
from megatron_averis.recipes import get_recipe

GPU_ONLY_ROWS = 4096  # larger shapes are too slow for the interpreter


def _skip_big(dev, rows, cols):
    if dev.type == "cpu" and rows * cols > GPU_ONLY_ROWS * 64:
        pytest.skip("large shape: GPU only")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts kernel launches per entry point, to prove the kernel path ran."""
    from megatron_averis.kernels import fp4

    calls = {"quantize": 0, "amax": 0, "scaled_values": 0}
    for name in calls:
        orig = getattr(fp4, name)

        def spy(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(fp4, name, spy)
    return calls


def _data(rows, cols, seed, dtype=torch.float32, device="cpu", kind="mixed"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) + 3 * torch.randn(cols, generator=g)
    if kind == "mixed":
        # outlier columns, an all-zero block, tiny blocks (subnormal E4M3 scales), huge values
        x[:, 3] *= 40
        x[: min(rows, 16), :16] = 0
        x[-1, -16:] *= 1e-30
        x[rows // 2, : min(cols, 32)] *= 1e-6
        x[rows // 3, -1] = 3e4
    return x.to(dtype).to(device)


def assert_same_qt(got: QuantizedTensor, want: QuantizedTensor):
    assert (got.fmt, got.block, tuple(got.shape)) == (want.fmt, want.block, tuple(want.shape))
    assert got.data.dtype == want.data.dtype and got.block_scales.dtype == want.block_scales.dtype
    assert got.data.shape == want.data.shape and got.block_scales.shape == want.block_scales.shape
    assert torch.equal(got.data, want.data), (got.data != want.data).sum().item()
    gs, ws = got.block_scales.float(), want.block_scales.float()
    assert torch.equal(gs.isnan(), ws.isnan())
    # NaN payloads/signs may differ; every other scale must be the same bit pattern
    ok = ~ws.isnan()
    assert torch.equal(got.block_scales.view(torch.uint8)[ok], want.block_scales.view(torch.uint8)[ok])
    gt, wt = got.tensor_scale, want.tensor_scale
    assert gt.shape == wt.shape and gt.dtype == wt.dtype and gt.device == wt.device
    assert torch.equal(gt.isnan(), wt.isnan())
    if not wt.isnan():
        assert gt.view(torch.int32) == wt.view(torch.int32), (gt.item(), wt.item())


def assert_same_tensor(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.is_floating_point():
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        # bit patterns, so that -0.0 and +0.0 count as different
        bits = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                torch.float16: torch.int16}
        assert torch.equal(got[ok].view(bits[got.dtype]), want[ok].view(bits[want.dtype]))
    else:
        assert torch.equal(got, want)


def assert_same_operand(got, want):
    assert got.shape == want.shape and got.mean_dim == want.mean_dim
    assert got.transposed == want.transposed
    assert_same_qt(got.qt, want.qt)
    if want.mean is None:
        assert got.mean is None
    elif isinstance(want.mean, QuantizedTensor):
        assert_same_qt(got.mean, want.mean)
    else:
        assert_same_tensor(got.mean, want.mean)


SHAPES = [(48, 80), (999, 96), (1000, 96), (16, 16), (64, 1040), (8192, 3072)]
NVFP4_BLOCKS = [(1, 16), (16, 16)]


def _shape_for(shape, block):
    rows, cols = shape
    rows -= rows % block[0]
    cols -= cols % block[1]
    return max(rows, block[0]), max(cols, block[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("block", NVFP4_BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rounding", ["rne", "stochastic"])
@pytest.mark.parametrize("transposed", [False, True])
def test_nvfp4_matches_reference(kdev, reference, kernel_calls, shape, block, dtype, rounding,
                                 transposed):
    rows, cols = _shape_for(shape, block)
    _skip_big(kdev, rows, cols)
    if dtype == torch.float16 and (rounding, transposed) != ("rne", False):
        pytest.skip("fp16 input: one combination is enough")
    src = _data(cols, rows, 1, dtype, kdev) if transposed else _data(rows, cols, 1, dtype, kdev)
    x = src.t() if transposed else src  # the operand view; no transposed copy
    kw = dict(block=block, rounding=rounding, sr_seed=1234 + rows, rng_offset=(32, 48))
    got = quantize_nvfp4(x, **kw)
    with reference():
        want = quantize_nvfp4(x, **kw)
    assert kernel_calls["quantize"] == 1 and kernel_calls["amax"] == 1
    assert_same_qt(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(48, 96), (999, 96), (1000, 160), (64, 1056), (8192, 3072)])
@pytest.mark.parametrize("rounding", ["rne", "stochastic"])
@pytest.mark.parametrize("transposed", [False, True])
def test_mxfp4_matches_reference(kdev, reference, kernel_calls, shape, dtype, rounding, transposed):
    rows, cols = shape
    _skip_big(kdev, rows, cols)
    src = _data(cols, rows, 2, dtype, kdev) if transposed else _data(rows, cols, 2, dtype, kdev)
    x = src.t() if transposed else src
    kw = dict(rounding=rounding, sr_seed=77, rng_offset=(5, 1024))
    got = quantize_mxfp4(x, **kw)
    with reference():
        want = quantize_mxfp4(x, **kw)
    assert kernel_calls["quantize"] == 1
    assert_same_qt(got, want)


def test_rne_ties_and_saturation(kdev, reference):
    """MXFP4 with block amax 6·2^k scales by exactly 2^k: every E2M1 midpoint is a tie."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.0, -0.0, 0.1, 5.9])
    row = torch.cat([mids, -mids, mids * 0.5, -mids * 0.5, torch.full((16,), 6.0)])[:64]
    x = torch.stack([row * 2.0**k for k in range(-8, 8)]).to(kdev)
    got = quantize_mxfp4(x)
    with reference():
        want = quantize_mxfp4(x)
    assert_same_qt(got, want)
    for block in NVFP4_BLOCKS:
        got = quantize_nvfp4(x, block)
        with reference():
            want = quantize_nvfp4(x, block)
        assert_same_qt(got, want)


@pytest.mark.parametrize("rounding", ["rne", "stochastic"])
def test_every_e2m1_boundary_and_its_neighbours(kdev, reference, rounding):
    """The kernels find E2M1 indices from FP32 bit patterns; the reference compares against
    thresholds. Every grid value and RNE midpoint, each with its FP32 neighbours on both sides,
    both signs, scaled exactly (MXFP4 blocks with amax 6·2^k) and not (NVFP4), must agree."""
    edges = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0,
                          5.0, 6.0, 7.0])
    vals = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    vals = torch.cat([vals, -vals, torch.tensor([float("inf"), -float("inf")])])
    per_block = 31  # each 32-block starts with its amax 6.0
    vals = torch.cat([vals, vals.new_zeros(-vals.numel() % per_block)]).view(-1, per_block)
    row = torch.cat([torch.full((vals.shape[0], 1), 6.0), vals], dim=1).reshape(-1)
    x = torch.stack([row * 2.0**k for k in range(-8, 8)]).to(kdev)
    for quantize in (lambda t: quantize_mxfp4(t, rounding, sr_seed=5),
                     lambda t: quantize_nvfp4(t, (1, 16), rounding, sr_seed=5, amax=t.new_tensor(7e3))):
        got = quantize(x)
        with reference():
            want = quantize(x)
        assert_same_qt(got, want)


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4-16x16", "mxfp4"])
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
def test_non_finite_inputs(kdev, reference, fmt, bad):
    x = _data(64, 128, 3, torch.float32, "cpu")
    x[5, 7] = float(bad)
    x = x.to(kdev)
    for rounding in ("rne", "stochastic"):
        if fmt == "mxfp4":
            got = quantize_mxfp4(x, rounding, sr_seed=3)
            with reference():
                want = quantize_mxfp4(x, rounding, sr_seed=3)
        else:
            block = (16, 16) if fmt.endswith("16x16") else (1, 16)
            got = quantize_nvfp4(x, block, rounding, sr_seed=3)
            with reference():
                want = quantize_nvfp4(x, block, rounding, sr_seed=3)
        assert_same_qt(got, want)


def test_amax_override_and_zero_tensor(kdev, reference):
    x = _data(32, 64, 4, torch.bfloat16, kdev)
    for amax in (torch.tensor(1e3), torch.tensor(0.5), torch.tensor(0.0), torch.tensor(float("inf"))):
        got = quantize_nvfp4(x, amax=amax.to(kdev))
        with reference():
            want = quantize_nvfp4(x, amax=amax.to(kdev))
        assert_same_qt(got, want)
    z = torch.zeros(32, 64, device=kdev)
    got = quantize_nvfp4(z)
    with reference():
        want = quantize_nvfp4(z)
    assert_same_qt(got, want)


@pytest.mark.parametrize("sub_dim", [0, 1])
def test_abs_max_with_subtraction(kdev, reference, sub_dim):
    x = _data(96, 64, 5, torch.bfloat16, kdev)
    sub = torch.randn(64 if sub_dim == 0 else 96, device=kdev)
    sub = sub.view(1, -1) if sub_dim == 0 else sub.view(-1, 1)
    got = abs_max(x, sub)
    with reference():
        want = abs_max(x, sub)
    assert_same_tensor(got, want)
    x[3, 3] = float("nan")
    assert abs_max(x, sub).isnan()


@pytest.mark.parametrize("fmt,block", [("nvfp4", (1, 16)), ("nvfp4", (16, 16)), ("mxfp4", (1, 32))])
@pytest.mark.parametrize("shape", [(48, 96), (1000, 96), (8192, 3072)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_values_match_reference(kdev, reference, kernel_calls, fmt, block, shape, dtype):
    rows, cols = _shape_for(shape, block)
    _skip_big(kdev, rows, cols)
    x = _data(rows, cols, 6, torch.float32, kdev)
    x[7, 40] = float("nan")  # a NaN scale must decode to NaN
    with reference():
        qt = quantize_mxfp4(x) if fmt == "mxfp4" else quantize_nvfp4(x, block, amax=x[:6].abs().amax())
        want = qt.scaled_values(dtype)
    got = qt.scaled_values(dtype)
    assert kernel_calls["scaled_values"] == 1
    assert_same_tensor(got, want)


class RecordingReducer:
    """A TP reducer stand-in: records what it is handed and returns a modified global value."""

    def __init__(self):
        self.sums, self.maxes = [], []

    def sum(self, t):
        self.sums.append(t.clone())
        return t * 2  # as if two ranks held the same statistics: the mean is unchanged

    def max(self, t):
        self.maxes.append(t.clone())
        return torch.maximum(t, torch.full_like(t, 9.0))


OPERAND_CASES = [
    # (mean_dim, rht, mean_format)
    (None, False, "bf16"), (None, True, "bf16"),
    (0, False, "bf16"), (0, False, "fp32"), (0, False, "nvfp4"), (0, True, "bf16"),
    (1, False, "bf16"), (1, False, "fp32"), (1, True, "bf16"), (1, True, "nvfp4"),
]


@pytest.mark.parametrize("token_sum", TOKEN_SUMS)
@pytest.mark.parametrize("mean_dim,rht,mean_format", OPERAND_CASES)
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("rounding", ["rne", "stochastic"])
@pytest.mark.parametrize("shape", [(64, 96), (992, 160), (8192, 3072)])
def test_quantize_operand_matches_reference(kdev, reference, kernel_calls, mean_dim,
                                            rht, mean_format, fmt, rounding, shape, token_sum):
    """fprop/dgrad operands [T, K] (mean_dim 0) and wgrad operands Xᵀ read from X [T, K]
    (mean_dim 1), with the mean split, the RHT, and the reducer hooks; under both token-sum
    orders (pairwise: the stats kernel computes the sums and the residual's range)."""
    if token_sum == "pairwise" and mean_dim is None:
        pytest.skip("no mean")
    t, k = shape
    _skip_big(kdev, t, k)
    x_src = _data(t, k, 7, torch.bfloat16, kdev)
    x = x_src.t() if mean_dim == 1 else x_src
    kw = dict(block=(1, 32) if fmt == "mxfp4" else (1, 16), rounding=rounding, mean_dim=mean_dim,
              mean_format=mean_format, signs=random_signs(11).to(kdev) if rht else None,
              sr_seed=99, rng_offset=(16, 32), transposed=mean_dim == 1, token_sum=token_sum)
    red_got, red_want = RecordingReducer(), RecordingReducer()
    got = quantize_operand(x, fmt, reducer=red_got, **kw)
    with reference():
        want = quantize_operand(x, fmt, reducer=red_want, **kw)
    assert kernel_calls["quantize"] >= 1
    assert_same_operand(got, want)
    assert len(red_got.sums) == len(red_want.sums) and len(red_got.maxes) == len(red_want.maxes)
    for a, b in zip(red_got.sums + red_got.maxes, red_want.sums + red_want.maxes):
        assert_same_tensor(a, b)


RHT_FORMATS = [("nvfp4", (1, 16)), ("nvfp4", (16, 16)), ("mxfp4", (1, 32))]


@pytest.mark.parametrize("fmt,block", RHT_FORMATS)
@pytest.mark.parametrize("rounding", ["rne", "stochastic"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("sub_dim", [None, 0, 1])
def test_fused_rht_matches_reference(kdev, reference, kernel_calls, fmt, block, rounding,
                                     transposed, sub_dim):
    """Quantizing blockwise_rht(x - sub) with the rotation in the kernel's registers: codes,
    scales, tensor scale and amax equal the reference (which rotates first) bit for bit. 80 rows
    leave a partial row tile; 96 columns a partial column tile of the transposed read."""
    rows, cols = 80, 96
    src = _data(cols, rows, 21, torch.bfloat16, kdev) if transposed else _data(rows, cols, 21,
                                                                               torch.bfloat16, kdev)
    x = src.t() if transposed else src
    signs = random_signs(11)
    g = torch.Generator().manual_seed(3)
    sub = None if sub_dim is None else (
        torch.randn(1, cols, generator=g) if sub_dim == 0 else torch.randn(rows, 1, generator=g)
    ).to(kdev)
    kw = dict(rounding=rounding, sr_seed=31, rng_offset=(16, 64), subtract=sub, signs=signs)
    quantize = (lambda t, **k: quantize_nvfp4(t, block, **k)) if fmt == "nvfp4" else quantize_mxfp4
    got = quantize(x, **kw)
    got_amax = abs_max(x, sub, signs)
    with reference():
        want = quantize(x, **kw)
        want_amax = abs_max(x, sub, signs)
        # the reference's definition: quantize the rotated residual
        rotated = blockwise_rht(x.float() if sub is None else x.float() - sub, signs)
        assert_same_qt(want, quantize(rotated, **dict(kw, subtract=None, signs=None)))
        assert_same_tensor(want_amax, rotated.abs().amax())
    assert kernel_calls["quantize"] == 1 and kernel_calls["amax"] == (2 if fmt == "nvfp4" else 1)
    assert_same_tensor(got_amax, want_amax)
    assert_same_qt(got, want)


@pytest.mark.parametrize("mean_dim", [None, 1])
def test_quantize_operand_fuses_rht(kdev, reference, monkeypatch, mean_dim):
    """With the kernels, the wgrad operand's rotation (and an unsplit one's) is not materialized:
    blockwise_rht never runs, and the result equals the reference's."""
    from megatron_averis.numerics import blockscale, operand

    x = _data(96, 64, 22, torch.bfloat16, kdev)
    kw = dict(mean_dim=mean_dim, signs=random_signs(4), rounding="stochastic", sr_seed=8,
              transposed=True)
    with reference():
        want = quantize_operand(x.t(), "nvfp4", **kw)
    calls = []

    def no_rotation(*a, **k):
        calls.append(1)
        raise AssertionError("the rotated operand was materialized")

    monkeypatch.setattr(operand, "blockwise_rht", no_rotation)
    monkeypatch.setattr(blockscale, "blockwise_rht", no_rotation)
    got = quantize_operand(x.t(), "nvfp4", **kw)
    assert not calls
    assert_same_operand(got, want)
    assert_same_tensor(got.amax, want.amax)


def test_fused_rht_argument_errors(kdev):
    from megatron_averis.kernels import fp4

    x = _data(16, 48, 23, torch.float32, kdev)
    with pytest.raises(ValueError, match="16 signs"):
        fp4.amax(x, signs=torch.ones(8))
    with pytest.raises(ValueError, match="divisible by 16"):
        fp4.amax(x[:, :40], signs=random_signs(1))


def test_quantize_operand_with_shared_mean(kdev, reference):
    """The wgrad operand Xᵀ reusing fprop's stored μ (the linear layer's `mean=`)."""
    x = _data(256, 96, 8, torch.bfloat16, kdev)
    fprop = quantize_operand(x, "nvfp4", mean_dim=0)
    kw = dict(mean_dim=1, rounding="stochastic", sr_seed=5, mean=fprop.mean, transposed=True)
    got = quantize_operand(x.t(), "nvfp4", **kw)
    with reference():
        want_f = quantize_operand(x, "nvfp4", mean_dim=0)
        want = quantize_operand(x.t(), "nvfp4", **kw)
    assert_same_operand(fprop, want_f)
    assert_same_operand(got, want)


def test_reference_only_forces_reference(kdev, kernel_calls):
    x = _data(32, 64, 9, torch.float32, kdev)
    with backend.reference_only():
        quantize_nvfp4(x)
        quantize_operand(x, "mxfp4", block=(1, 32), mean_dim=0)
        quantize_nvfp4(x).scaled_values()
    assert kernel_calls == {"quantize": 0, "amax": 0, "scaled_values": 0}
    quantize_nvfp4(x)
    assert kernel_calls["quantize"] == 1


def test_argument_errors_match_reference(kdev):
    x = _data(32, 64, 10, torch.float32, kdev)
    with pytest.raises(ValueError, match="needs an sr_seed"):
        quantize_nvfp4(x, rounding="stochastic")
    with pytest.raises(ValueError, match="unknown rounding"):
        quantize_mxfp4(x, rounding="up")
    with pytest.raises(ValueError, match="not divisible"):
        quantize_nvfp4(x[:, :40])


@pytest.mark.parametrize("token_sum", TOKEN_SUMS)
@pytest.mark.parametrize("recipe", ["nvfp4-plain", "averis", "mxfp4", "nvfp4", "averis-rht"])
def test_linear_step_identical_with_kernels(kdev, reference, recipe, token_sum):
    """The whole quantized linear (forward + backward): same outputs and gradients bit for bit."""
    x = _data(128, 64, 11, torch.float32, kdev)
    gy = _data(128, 96, 12, torch.float32, kdev) * 0.01

    def run():
        # a fresh layer: the SR seeds depend on the layer's call counter
        torch.manual_seed(0)
        layer = QuantizedLinear(64, 96, recipe=get_recipe(recipe, [f"token_sum={token_sum}"]),
                                device=kdev, stream_id=3)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(gy)
        return y.detach(), xi.grad, layer.weight.grad

    got = run()
    with reference():
        want = run()
    for a, b in zip(got, want):
        assert_same_tensor(a, b)


def test_step_seed_reads_the_step_from_device_memory(kdev, reference, kernel_calls):
    """The quantize kernel folds a StepSeed's device-resident step into its key as the reference
    does, so it draws the bits of the int seed mix_seed(*parts, step), and a step moved in place
    (a replayed CUDA graph) changes them."""
    x = _data(48, 64, 21, torch.float32, kdev)
    step = torch.tensor([5], dtype=torch.int64, device=kdev)
    seed = StepSeed(mix_seed(9, 2), step)
    kw = dict(rounding="stochastic", rng_offset=(16, 32))
    got = quantize_nvfp4(x, sr_seed=seed, **kw)
    assert kernel_calls["quantize"] == 1
    step.fill_(6)
    later = quantize_nvfp4(x, sr_seed=seed, **kw)
    with reference():
        assert_same_qt(got, quantize_nvfp4(x, sr_seed=mix_seed(9, 2, 5), **kw))
        assert_same_qt(later, quantize_nvfp4(x, sr_seed=mix_seed(9, 2, 6), **kw))
    assert not torch.equal(got.data, later.data)


def test_sr_stream_matches_position_uniform(kdev, reference):
    """Shards quantized with their global offsets reproduce the whole tensor's SR codes."""
    x = _data(64, 128, 13, torch.float32, kdev)
    amax = x.abs().amax()
    whole = quantize_nvfp4(x, rounding="stochastic", sr_seed=42, amax=amax)
    top = quantize_nvfp4(x[:32], rounding="stochastic", sr_seed=42, amax=amax)
    right = quantize_nvfp4(x[32:, 64:], rounding="stochastic", sr_seed=42, amax=amax,
                           rng_offset=(32, 64))
    assert torch.equal(top.data, whole.data[:32])
    assert torch.equal(right.data, whole.data[32:, 32:])
    # and SR is unbiased-looking: the kernel's codes differ from RNE's for a good share of elements
    rne = quantize_nvfp4(x, amax=amax)
    frac = (rne.data != whole.data).float().mean().item()
    assert 0.2 < frac < 0.95, frac
    np.testing.assert_array_equal(whole.block_scales.float().cpu().numpy(),
                                  rne.block_scales.float().cpu().numpy())


@pytest.mark.parametrize("fmt,blocks", [("nvfp4", ((1, 16), (16, 16))), ("nvfp4", ((1, 16), (1, 16))),
                                        ("mxfp4", ((1, 32), (1, 32)))])
@pytest.mark.parametrize("shape", [(200, 144, 256), (8192, 3072, 1024)])
def test_fused_gemm_is_fp32_accumulation_of_the_exact_values(kdev, fmt, blocks, shape):
    """The Triton GEMM on packed FP4: the FP32 sum of exact products, times s_A·s_B."""
    m, n, k = shape
    _skip_big(kdev, m, k)
    from megatron_averis.kernels import fp4

    a, b = _data(m, k, 14, torch.bfloat16, kdev), _data(n, k, 15, torch.bfloat16, kdev)
    quant = (lambda t, blk: quantize_mxfp4(t)) if fmt == "mxfp4" else (
        lambda t, blk: quantize_nvfp4(t, blk))
    qa, qb = quant(a, blocks[0]), quant(b, blocks[1])
    s = qa.tensor_scale * qb.tensor_scale
    got = fp4.scaled_mm(qa.data, qa.block_scales, qa.block, qb.data, qb.block_scales, qb.block,
                        fmt, s).double().cpu()
    va = qa.scaled_values(torch.float32).double().cpu()
    vb = qb.scaled_values(torch.float32).double().cpu()
    want = (va @ vb.t()) * s.double().cpu()
    bound = (k * 2.0**-24 + 2.0**-24) * (va.abs() @ vb.abs().t()) * s.double().cpu()
    assert ((got - want).abs() <= bound + 1e-30).all()


QGEMM_CASES = [(None, None), (0, None), (None, 0), (0, 0), (1, 1), (1, None), (None, 1), (0, 1), (1, 0)]


def _qgemm_operands(kdev, mean_a, mean_b, rht):
    a = _data(64, 128, 16, torch.bfloat16, kdev)
    b = _data(96, 128, 17, torch.bfloat16, kdev)
    signs = random_signs(5).to(kdev) if rht else None
    kw = dict(signs=signs, rounding="stochastic", sr_seed=3)
    return (quantize_operand(a, "nvfp4", mean_dim=mean_a, **kw),
            quantize_operand(b, "nvfp4", mean_dim=mean_b, **kw))


@pytest.mark.parametrize("mean_a,mean_b", QGEMM_CASES)
@pytest.mark.parametrize("rht", [False, True])
@pytest.mark.parametrize("with_bias,out_dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_qgemm_epilogue_matches_reference(kdev, reference, mean_a, mean_b, rht, with_bias,
                                          out_dtype):
    """Scale, every kind of mean term, the bias and the rounding to the output dtype applied by
    one kernel pass: bit-identical to qgemm's reference `out * scale; out += term; .to()`."""
    from megatron_averis.numerics import qgemm

    qa, qb = _qgemm_operands(kdev, mean_a, mean_b, rht)
    bias = _data(1, 96, 18, torch.bfloat16, kdev).view(96) if with_bias else None
    got = qgemm(qa, qb, bias=bias, out_dtype=out_dtype)
    with reference():
        want = qgemm(qa, qb, bias=bias, out_dtype=out_dtype)
    assert got.dtype == want.dtype == out_dtype
    assert_same_tensor(got, want)


@pytest.mark.parametrize("mean_a,mean_b", QGEMM_CASES)
@pytest.mark.parametrize("rht", [False, True])
def test_qgemm_accumulates_in_the_epilogue(kdev, reference, monkeypatch, mean_a, mean_b, rht):
    """qgemm(accumulate=main_grad): the epilogue adds the FP32 result into the accumulator in
    the same pass, bit for bit the reference's `main_grad.add_(qgemm(...))`, and writes no
    separate product; a wrong accumulator is refused."""
    from megatron_averis.kernels import fp4
    from megatron_averis.numerics import qgemm

    accumulators = []
    real = fp4.scale_and_add_terms
    monkeypatch.setattr(fp4, "scale_and_add_terms",
                        lambda *a, **k: accumulators.append(a[4] if len(a) > 4 else None)
                        or real(*a, **k))
    qa, qb = _qgemm_operands(kdev, mean_a, mean_b, rht)
    start = _data(64, 96, 19, torch.float32, kdev)
    acc = start.clone()
    out = qgemm(qa, qb, accumulate=acc)
    assert out is acc and len(accumulators) == 1 and accumulators[0] is acc
    with reference():
        want = start.clone().add_(qgemm(qa, qb))
    assert_same_tensor(acc, want)
    for bad in (start.t().contiguous(), start.to(torch.bfloat16), start.t().contiguous().t()):
        with pytest.raises(ValueError, match="accumulate must be a contiguous FP32"):
            qgemm(qa, qb, accumulate=bad)


@pytest.mark.parametrize("mean_a,mean_b", QGEMM_CASES)
def test_fused_gemm_with_mean_terms(kdev, monkeypatch, mean_a, mean_b):
    """fp4_gemm="fused": same result as the dequant path up to FP32 summation order."""
    from megatron_averis.kernels import fp4
    from megatron_averis.numerics import qgemm

    calls = []
    real = fp4.scaled_mm
    monkeypatch.setattr(fp4, "scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    qa, qb = _qgemm_operands(kdev, mean_a, mean_b, rht=False)
    dequant = qgemm(qa, qb)
    assert not calls
    fused = qgemm(qa, qb, fp4_gemm="fused")
    assert calls == [1]
    assert (fused - dequant).abs().max() <= 1e-5 * dequant.abs().max()
    with pytest.raises(ValueError, match="fp4_gemm='bogus'"):
        qgemm(qa, qb, fp4_gemm="bogus")


@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (65, 33), (1000, 96), (4096, 40), (8192, 3072)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_token_stats_equal_pairwise_sum(kdev, shape, dtype):
    """The stats pass: sums bit-identical to operand.pairwise_sum (incl. the sign of zero), and
    exact per-feature min / max with NaN propagation."""
    from megatron_averis.kernels import fp4

    t, f = shape
    _skip_big(kdev, t, f)
    x = _data(t, f, 18, dtype, "cpu", kind="plain")
    x[:, 0] = -0.0  # a column of -0.0 sums to -0.0
    if f > 2:
        x[t // 2, 1] = float("nan")
        x[0, 2] = float("inf")
    x = x.to(kdev)
    for dim, v in ((0, x), (1, x.t())):
        sums, (lo, hi) = fp4.token_stats(v, dim)
        assert_same_tensor(sums, pairwise_sum(v, dim))
        assert_same_tensor(lo, v.float().amin(dim))
        assert_same_tensor(hi, v.float().amax(dim))


@pytest.mark.parametrize("features", [1, 7, 1024, 3000])
def test_range_amax_is_the_residual_amax(kdev, features):
    """range_amax(min, max, μ) of the stats pass equals max |x - μ| read from x itself (float64
    differences rounded once to FP32, the exact value of each FP32 subtraction), over one or
    several of the kernel's 1024-feature chunks; a NaN anywhere gives NaN."""
    from megatron_averis.kernels import fp4

    x = _data(96, features, 23, torch.float32, "cpu", kind="plain") * 3.0
    x[5, 0] = -0.0
    m = x.mean(0) + 0.25
    want = (x.double() - m.double()).float().abs().amax()
    lo, hi = x.amin(0), x.amax(0)
    got = fp4.range_amax(lo.to(kdev), hi.to(kdev), m.to(kdev))
    assert_same_tensor(got.cpu(), want)
    lo[features // 2] = float("nan")
    assert fp4.range_amax(lo.to(kdev), hi.to(kdev), m.to(kdev)).isnan()
    hi[-1] = float("inf")
    lo[features // 2] = 0.0
    assert fp4.range_amax(lo.to(kdev), hi.to(kdev), m.to(kdev)).item() == float("inf")


def test_token_sum_choice():
    from megatron_averis.numerics.operand import token_mean

    with pytest.raises(ValueError, match="token_sum='bogus'"):
        token_mean(torch.ones(4, 2), 0, token_sum="bogus")
    # pairwise_sum is a pairwise tree: (1 + 0) + (2^-24 + 2^-24) = 1 + 2^-23 in FP32, where a
    # left-to-right sum loses both 2^-24 to rounding
    x = torch.tensor([[1.0], [0.0], [2.0**-24], [2.0**-24], [0.0]])
    assert pairwise_sum(x, 0).item() == 1.0 + 2.0**-23
    assert pairwise_sum(x.t(), 1).item() == 1.0 + 2.0**-23


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_sr_with_index_tensor_offsets(kdev, reference, fmt):
    """rng_offset entries given as global index tensors (strided SwiGLU shards)."""
    x = _data(48, 64, 19, torch.bfloat16, kdev)
    rows = torch.arange(48, device=kdev) * 2 + 7
    cols = torch.cat([torch.arange(32), torch.arange(32) + 1000]).to(kdev)
    for off in ((rows, 5), (3, cols), (rows, cols)):
        if fmt == "mxfp4":
            got = quantize_mxfp4(x, "stochastic", sr_seed=9, rng_offset=off)
            with reference():
                want = quantize_mxfp4(x, "stochastic", sr_seed=9, rng_offset=off)
        else:
            got = quantize_nvfp4(x, rounding="stochastic", sr_seed=9, rng_offset=off)
            with reference():
                want = quantize_nvfp4(x, rounding="stochastic", sr_seed=9, rng_offset=off)
        assert_same_qt(got, want)
    with pytest.raises(ValueError, match="global indices"):
        quantize_nvfp4(x, rounding="stochastic", sr_seed=9, rng_offset=(rows[:5], 0))


# ---- one pass: quantize writes the GEMM operand (code × block scale) ----------------------------

VALUE_CASES = [  # (sub_dim, rht): plain, the Averis residual along either dimension, rotated
    (None, False), (0, False), (1, True),
]


def _values_case(kdev, shape, transposed, sub_dim, rht, seed=24):
    rows, cols = shape
    src = _data(cols, rows, seed, torch.bfloat16, "cpu") if transposed else _data(
        rows, cols, seed, torch.bfloat16, "cpu")
    src[min(rows, cols) // 2, 5] = float("nan")  # a NaN block scale must decode to NaN
    src = src.to(kdev)
    x = src.t() if transposed else src
    g = torch.Generator().manual_seed(seed)
    sub = None if sub_dim is None else (
        torch.randn(1, cols, generator=g) if sub_dim == 0 else torch.randn(rows, 1, generator=g)
    ).to(kdev)
    return x, sub, random_signs(13) if rht else None


@pytest.mark.parametrize("fmt,block", RHT_FORMATS)
@pytest.mark.parametrize("rounding", ["rne", "stochastic"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("sub_dim,rht", VALUE_CASES)
@pytest.mark.parametrize("shape", [(80, 96), (8192, 3072)])
def test_quantize_writes_the_dequantized_values(kdev, reference, fmt, block, rounding, transposed,
                                                sub_dim, rht, shape):
    """fp4.quantize(values=dtype) writes, in its own pass, exactly what fp4.scaled_values makes of
    the codes and scales it stores and what the reference QuantizedTensor.scaled_values gives;
    the payload is unchanged by the option, and payload=False writes the same values alone.
    80 rows / 96 columns leave partial tiles in both orientations."""
    _skip_big(kdev, *shape)
    from megatron_averis.kernels import fp4

    x, sub, signs = _values_case(kdev, shape, transposed, sub_dim, rht)
    # A NaN makes NVFP4's tensor amax NaN and every value NaN: take the amax of the rest, so
    # that only the NaN's block decodes to NaN (as MXFP4's does by itself).
    amax = x.float().nan_to_num(0.0).abs().amax() * 2 if fmt == "nvfp4" else None
    sr = (dict(sr_key=seed_key(1234), rng_offset=(16, 32)) if rounding == "stochastic" else {})
    kw = dict(sub=sub, signs=signs, **sr, **({} if amax is None else dict(amax_t=amax)))
    plain = fp4.quantize(x, fmt, block, **kw)
    for dtype in (torch.bfloat16, torch.float32):
        data, scales, tensor_scale, values = fp4.quantize(x, fmt, block, values=dtype, **kw)
        assert plain[3] is None and values.is_contiguous()
        for got, want in zip((data, scales, tensor_scale), plain[:3]):
            assert_same_tensor(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                               want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)
        assert_same_tensor(values, fp4.scaled_values(data, scales, block, fmt, dtype))
        none, no_scales, ts_alone, alone = fp4.quantize(x, fmt, block, values=dtype,
                                                        payload=False, **kw)
        assert none is None and no_scales is None
        assert_same_tensor(alone, values)
        assert_same_tensor(ts_alone, tensor_scale)
    quantize = (lambda t, **k: quantize_nvfp4(t, block, **k)) if fmt == "nvfp4" else quantize_mxfp4
    with reference():
        want = quantize(x, rounding=rounding, sr_seed=1234, rng_offset=(16, 32), subtract=sub,
                        signs=signs, **({} if amax is None else dict(amax=amax)))
    assert values.isnan().any() and not values.isnan().all()
    assert_same_tensor(values, want.scaled_values(torch.float32))
    assert_same_tensor(alone.bfloat16(), want.scaled_values(torch.bfloat16))


@pytest.mark.parametrize("fmt,block", RHT_FORMATS)
@pytest.mark.parametrize("payload", [True, False])
def test_quantizers_carry_the_values(kdev, reference, kernel_calls, fmt, block, payload):
    """quantize_nvfp4 / quantize_mxfp4(values=BF16): scaled_values() and dequantize() return the
    reference's bits without launching the dequantize kernel; without the payload the tensor says
    clearly that it cannot be saved, communicated or transposed."""
    x = _data(64, 96, 25, torch.bfloat16, kdev)
    quantize = (lambda t, **k: quantize_nvfp4(t, block, **k)) if fmt == "nvfp4" else (
        lambda t, **k: quantize_mxfp4(t, **k))
    got = quantize(x, values=torch.bfloat16, payload=payload)
    with reference():
        want = quantize(x)
        want_values, want_fp64 = want.scaled_values(), want.dequantize()
    assert got.has_payload == payload and got.values is not None
    assert_same_tensor(got.scaled_values(), want_values)
    assert_same_tensor(got.dequantize(), want_fp64)
    assert kernel_calls["scaled_values"] == 0
    if payload:
        assert_same_qt(got, want)
    else:
        with pytest.raises(ValueError, match="GEMM only"):
            got.packed()
    with pytest.raises(ValueError, match="keeps nothing"):
        quantize(x, payload=False)


@pytest.mark.parametrize("payload", [True, False])
def test_transposed_values_stay_exact(kdev, reference, payload):
    """A 16x16-block tensor's transpose (the shared weight's dgrad operand) and a reoriented
    operand (quantize-once recipes) reuse the one-pass values: the transposed values equal the
    reference's values of the transposed tensor."""
    from megatron_averis.numerics.operand import quantize_operand

    w = _data(48, 64, 26, torch.bfloat16, kdev)
    with reference():
        want = quantize_nvfp4(w, (16, 16))
        want_t = want.t().scaled_values()
        want_op = quantize_operand(w, "nvfp4", block=(16, 16))
        want_re = want_op.reoriented().values()
    got = quantize_nvfp4(w, (16, 16), values=torch.bfloat16, payload=payload)
    if payload:
        assert_same_qt(got.t(), want.t())
        assert_same_tensor(got.t().scaled_values(), want_t)
        assert_same_tensor(got.t().scaled_values(torch.float32), want.t().scaled_values(torch.float32))
    else:  # the transpose is a view of the values; only its payload is refused
        assert_same_tensor(got.t().scaled_values(), want_t)
        assert not got.t().has_payload and got.t().data is None
        with pytest.raises(ValueError, match="GEMM only"):
            got.t().packed()
    op = quantize_operand(w, "nvfp4", block=(16, 16), output="both" if payload else "values")
    assert_same_tensor(op.reoriented().values(), want_re)


@pytest.mark.parametrize("output", ["values", "both"])
@pytest.mark.parametrize("mean_dim,rht,mean_format", [(0, False, "bf16"), (1, True, "nvfp4"),
                                                      (None, True, "bf16"), (1, False, "fp32")])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_quantize_operand_outputs(kdev, reference, kernel_calls, output, mean_dim, rht,
                                  mean_format, fmt):
    """quantize_operand(output=...): the GEMM operand comes from the quantize pass, the payload
    only where asked for, and every product equals the reference operand's."""
    t, k = 64, 96
    x_src = _data(t, k, 27, torch.bfloat16, kdev)
    x = x_src.t() if mean_dim == 1 else x_src
    kw = dict(block=(1, 32) if fmt == "mxfp4" else (1, 16), rounding="stochastic",
              mean_dim=mean_dim, mean_format=mean_format,
              signs=random_signs(11) if rht else None, sr_seed=99, transposed=mean_dim == 1)
    got = quantize_operand(x, fmt, output=output, **kw)
    with reference():
        want = quantize_operand(x, fmt, **kw)
        want_values, want_fp64 = want.values(), want.dequantize()
    calls = kernel_calls["scaled_values"]
    assert_same_tensor(got.values(), want_values)
    assert kernel_calls["scaled_values"] == calls  # nothing read the codes again
    assert_same_tensor(got.dequantize(), want_fp64)
    if output == "both":
        assert_same_operand(got, want)
        assert got.nbytes() == want.nbytes()
    else:
        assert not got.qt.has_payload
        with pytest.raises(ValueError, match="GEMM only"):
            got.payload()
    with pytest.raises(ValueError, match="output='bogus'"):
        quantize_operand(x, fmt, output="bogus", **kw)


@pytest.mark.parametrize("recipe", ["averis", "nvfp4-nohadamard", "nvfp4", "mxfp4"])
def test_linear_accumulates_fp32_dw_into_main_grad(kdev, reference, recipe):
    """With a main_grad (megatron-core's DDP) the linear adds dW into it in the wgrad epilogue:
    over two micro-batches, main_grad equals the reference path's bit for bit, and the weight's
    own grad stays unset."""
    x = _data(128, 64, 30, torch.bfloat16, kdev)
    gy = _data(128, 96, 31, torch.bfloat16, kdev) * 0.01

    def run():
        torch.manual_seed(0)
        layer = QuantizedLinear(64, 96, bias=False, recipe=get_recipe(recipe), device=kdev,
                                stream_id=6)
        layer.ctx.accumulate_main_grad = True
        layer.weight.main_grad = _data(96, 64, 32, torch.float32, kdev)
        for _ in range(2):
            layer(x).backward(gy)
        assert layer.weight.grad is None
        return layer.weight.main_grad

    got = run()
    with reference():
        want = run()
    assert_same_tensor(got, want)


@pytest.mark.parametrize("recipe", ["nvfp4-plain", "nvfp4-nohadamard", "averis", "averis-paper",
                                    "mxfp4", "nvfp4"])
def test_linear_reads_only_saved_operands_again(kdev, reference, kernel_calls, recipe):
    """In the linear, the operands a GEMM reads at once get their values from the quantize pass:
    the dequantize kernel runs only for the two operands backward unpacks from the saved payload
    (X's wgrad operand and W's dgrad operand); outputs and gradients equal the reference's."""
    x = _data(128, 64, 28, torch.float32, kdev)
    gy = _data(128, 96, 29, torch.float32, kdev) * 0.01

    def run():
        torch.manual_seed(0)
        layer = QuantizedLinear(64, 96, recipe=get_recipe(recipe), device=kdev, stream_id=5)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        forward_dequantized = kernel_calls["scaled_values"]
        y.backward(gy)
        return (y.detach(), xi.grad, layer.weight.grad), forward_dequantized

    got, forward_dequantized = run()
    assert forward_dequantized == 0
    assert kernel_calls["scaled_values"] == 2
    with reference():
        want, _ = run()
    for a, b in zip(got, want):
        assert_same_tensor(a, b)
