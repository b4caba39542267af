"""The Averis split and the emulated GEMM against a float64 reference built from fp4_reference."""

import numpy as np
import pytest
import torch

import fp4_reference as ref
from megatron_averis.numerics import quantize_nvfp4, quantize_operand, qgemm, random_signs
from megatron_averis.numerics.qgemm import mm_fp32


def _mean_biased(rows, cols, seed, scale=4.0):
    """Tokens x features with a strong per-feature mean over tokens (what LLM activations show)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(cols, generator=g) * scale
    return torch.randn(rows, cols, generator=g) + mu


def _bf16(v):
    return torch.tensor(v, dtype=torch.float64).to(torch.bfloat16).double().numpy()


def _np_pairwise_sum(x: np.ndarray, axis: int) -> np.ndarray:
    """FP32 sums along `axis` by the specified tree: zero rows up to a power of two, then
    adjacent pairs added level by level, one FP32 addition per pair (numpy)."""
    v = np.moveaxis(x.astype(np.float32), axis, 0)
    p = 1 << max(v.shape[0] - 1, 0).bit_length()
    v = np.concatenate([v, np.zeros((p - v.shape[0],) + v.shape[1:], np.float32)])
    while v.shape[0] > 1:
        v = (v[0::2] + v[1::2]).astype(np.float32)
    return v[0]


def ref_split(x, mean_dim, mean_format="bf16", device="cpu", token_sum="pairwise"):
    """Reference mean split: (μ̂, R̂) in float64 with R = x - μ̂ computed in FP32 as specified.

    μ is the FP32 column mean: the pairwise tree of FP32 sums (numpy), or with token_sum="torch"
    torch.sum in FP32 on the same device (summation order is the device's); either is checked
    against float64, and the format rounding and the split follow from it."""
    if token_sum == "torch":
        n = torch.tensor(float(x.shape[mean_dim]), device=device)  # true division, as specified
        mu = (x.to(device).float().sum(mean_dim) / n).cpu().numpy()
    else:
        mu = _np_pairwise_sum(x.float().numpy(), mean_dim) / np.float32(x.shape[mean_dim])
    x = x.numpy().astype(np.float32)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=mean_dim), rtol=0,
                               atol=4 * np.abs(x).max() * 2**-24)
    mu_hat = {"bf16": _bf16(mu.astype(np.float64)), "fp32": mu.astype(np.float64),
              "nvfp4": ref.nvfp4(mu.reshape(1, -1))[0].reshape(-1).astype(np.float32).astype(np.float64)}[mean_format]
    m = mu_hat.astype(np.float32)
    r = x - (m.reshape(1, -1) if mean_dim == 0 else m.reshape(-1, 1))
    return mu_hat, ref.nvfp4(r)[0]


@pytest.mark.parametrize("token_sum", ["pairwise", "torch"])
@pytest.mark.parametrize("mean_format", ["fp32", "bf16", "nvfp4"])
@pytest.mark.parametrize("mean_dim", [0, 1])
def test_split_matches_reference_and_restores_exactly(device, mean_dim, mean_format, token_sum):
    x = _mean_biased(64, 48, 0)  # mean_dim=1 sums 48: the pairwise tree pads to 64
    op = quantize_operand(x.to(device), "nvfp4", mean_dim=mean_dim, mean_format=mean_format,
                          token_sum=token_sum)
    mu_hat, r_hat = ref_split(x, mean_dim, mean_format, device, token_sum)
    np.testing.assert_array_equal(op.mean_fp32().cpu().double().numpy(), mu_hat)
    np.testing.assert_array_equal(op.qt.dequantize().cpu().numpy(), r_hat)
    full = r_hat + (mu_hat.reshape(1, -1) if mean_dim == 0 else mu_hat.reshape(-1, 1))
    np.testing.assert_array_equal(op.dequantize().cpu().numpy(), full)


def test_split_reduces_quantization_error_on_mean_biased_operands(device):
    for seed in range(3):
        x = _mean_biased(256, 128, seed)
        plain = quantize_operand(x.to(device), "nvfp4").dequantize().cpu()
        split = quantize_operand(x.to(device), "nvfp4", mean_dim=0).dequantize().cpu()
        err_plain = (plain - x.double()).norm() / x.double().norm()
        err_split = (split - x.double()).norm() / x.double().norm()
        assert err_split < 0.5 * err_plain, (err_split, err_plain)


def test_mm_fp32_is_exact_fp32_accumulation(device):
    a = quantize_nvfp4(_mean_biased(32, 64, 1).to(device)).scaled_values()
    b = quantize_nvfp4(_mean_biased(16, 64, 2).to(device)).scaled_values()
    got = mm_fp32(a, b).cpu().double()
    want = a.cpu().double() @ b.cpu().double().t()
    # products are exact; only the FP32 sum of 64 terms rounds
    assert ((got - want).abs() <= 64 * 2**-24 * (a.cpu().double().abs() @ b.cpu().double().abs().t())).all()


def _close(got, want, rtol=2e-6):
    got = got.cpu().double().numpy()
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale * 8)


def test_fprop_identity(device):
    """Y = Q(R_X)·Q(W)ᵀ + 1·(Q(W)·μ)ᵀ."""
    x, w = _mean_biased(64, 64, 3), torch.randn(32, 64) * 0.05
    xq = quantize_operand(x.to(device), "nvfp4", mean_dim=0)
    wq = quantize_operand(w.to(device), "nvfp4", block=(16, 16))
    mu, r_hat = ref_split(x, 0, device=device)
    w_hat = ref.nvfp4(w.numpy(), (16, 16))[0]
    _close(qgemm(xq, wq), r_hat @ w_hat.T + (w_hat @ mu)[None, :])


def test_dgrad_identity(device):
    """dX = Q(R_G)·Q(W) + 1·(Q(W)ᵀ·μ_G)ᵀ with Wᵀ from the same 2-D quantization."""
    g, w = _mean_biased(64, 32, 4), torch.randn(32, 64) * 0.05
    gq = quantize_operand(g.to(device), "nvfp4", mean_dim=0)
    wq_t = quantize_operand(w.to(device), "nvfp4", block=(16, 16)).t()
    mu, r_hat = ref_split(g, 0, device=device)
    w_hat = ref.nvfp4(w.numpy(), (16, 16))[0]
    _close(qgemm(gq, wq_t), r_hat @ w_hat + (w_hat.T @ mu)[None, :])


def _wgrad_both_split(device, t=128):
    """Gᵀ [32, T] and Xᵀ [48, T] split along tokens, and the float64 dW of the identity
    Q(R_Gᵀ)·Q(R_Xᵀ)ᵀ + T·μ_G·μ_Xᵀ (the cross terms vanish for the exact residuals)."""
    g, x = _mean_biased(t, 32, 5), _mean_biased(t, 48, 6)
    gq = quantize_operand(g.t().contiguous().to(device), "nvfp4", mean_dim=1)
    xq = quantize_operand(x.t().contiguous().to(device), "nvfp4", mean_dim=1)
    mu_g, rg = ref_split(g.t().contiguous(), 1, device=device)
    mu_x, rx = ref_split(x.t().contiguous(), 1, device=device)
    return gq, xq, rg @ rx.T + t * np.outer(mu_g, mu_x)


def test_wgrad_identity_both_split(device):
    gq, xq, want = _wgrad_both_split(device)
    _close(qgemm(gq, xq), want)


def test_wgrad_identity_one_split(device):
    """Only Gᵀ split: dW = Q(R_Gᵀ)·Q(Xᵀ)ᵀ + μ_G·(Q(Xᵀ)·1)ᵀ — the cross term is kept."""
    t = 64
    g, x = _mean_biased(t, 32, 7), _mean_biased(t, 16, 8)
    gq = quantize_operand(g.t().contiguous().to(device), "nvfp4", mean_dim=1)
    xq = quantize_operand(x.t().contiguous().to(device), "nvfp4")
    mu_g, rg = ref_split(g.t().contiguous(), 1, device=device)
    x_hat = ref.nvfp4(x.t().numpy())[0]
    _close(qgemm(gq, xq), rg @ x_hat.T + np.outer(mu_g, x_hat.sum(axis=1)))
    _close(qgemm(xq, gq), (rg @ x_hat.T + np.outer(mu_g, x_hat.sum(axis=1))).T)


def test_wgrad_accumulates_into_fp32(device):
    """qgemm(accumulate=acc): dW added into an FP32 accumulator (wgrad's main_grad) in place,
    within FP32 accumulation of the float64 identity on top of what acc held; bad
    accumulators are refused before any work."""
    gq, xq, want = _wgrad_both_split(device)
    start = torch.randn(32, 48, generator=torch.Generator().manual_seed(9)).to(device)
    acc = start.clone()
    assert qgemm(gq, xq, accumulate=acc) is acc
    _close(acc - start, want)
    for bad in (torch.zeros(48, 32), torch.zeros(32, 48, dtype=torch.bfloat16),
                torch.zeros(48, 32).t()):
        with pytest.raises(ValueError, match="accumulate must be a contiguous FP32"):
            qgemm(gq, xq, accumulate=bad.to(device))


def test_mixed_mean_dims_and_rht(device):
    """General identities: A split along rows, B along the reduction dim, both rotated."""
    signs = random_signs(11)
    a, b = _mean_biased(32, 64, 9), _mean_biased(64, 24, 10).t().contiguous()  # b: [24, 64]
    aq = quantize_operand(a.to(device), "nvfp4", mean_dim=0, signs=signs)
    bq = quantize_operand(b.to(device), "nvfp4", mean_dim=1, signs=signs)
    # reference: rotate in float64, split, quantize; e = Hᵀ1
    ar = ref.rht(a.numpy(), signs.numpy()).astype(np.float32)
    mu_a = _bf16(ar.astype(np.float64).mean(0))  # bf16 rounding hides FP32 summation order here
    ra = ref.nvfp4(ar - mu_a.astype(np.float32)[None, :])[0]
    bn = b.numpy()
    mu_b = _bf16(bn.astype(np.float64).mean(1))
    rb = ref.nvfp4(ref.rht(bn - mu_b.astype(np.float32)[:, None], signs.numpy()).astype(np.float32))[0]
    e = ref.rht(np.ones((1, 64)), signs.numpy()).reshape(-1)
    ua = np.ones((32, 1)) * mu_a[None, :]
    ub = mu_b[:, None] * e[None, :]
    _close(qgemm(aq, bq), (ra + ua) @ (rb + ub).T)
    # and the rotation cancels: close to the unquantized product
    exact = a.double().numpy() @ b.double().numpy().T
    assert np.linalg.norm(qgemm(aq, bq).cpu().double().numpy() - exact) < 0.1 * np.linalg.norm(exact)


def test_mismatched_operands_rejected():
    a = quantize_operand(torch.randn(16, 32), "nvfp4", signs=random_signs(1))
    b = quantize_operand(torch.randn(16, 32), "nvfp4")
    with pytest.raises(ValueError, match="same Hadamard"):
        qgemm(a, b)
    with pytest.raises(ValueError, match="reduction dimensions"):
        qgemm(quantize_operand(torch.randn(16, 32), "nvfp4"), quantize_operand(torch.randn(16, 48), "nvfp4"))
    with pytest.raises(ValueError, match="only to FP4"):
        quantize_operand(torch.randn(16, 32), "bf16", mean_dim=0)


def test_output_requests_keep_the_reference_and_check_their_arguments(device):
    """output= / values= / payload= only tell the GPU kernel what to write: the reference (and
    the kernels, tests/unit_tests/kernels) give the same operand and GEMM values either way."""
    x = _mean_biased(64, 96, 31).to(device)
    base = quantize_operand(x, "nvfp4", mean_dim=0)
    for output in ("values", "both"):
        op = quantize_operand(x, "nvfp4", mean_dim=0, output=output)
        assert torch.equal(op.values().view(torch.int16), base.values().view(torch.int16))
        assert torch.equal(op.dequantize(), base.dequantize())
    with pytest.raises(ValueError, match="output='bogus' is unknown"):
        quantize_operand(x, "nvfp4", output="bogus")
    with pytest.raises(ValueError, match="payload=False keeps nothing"):
        quantize_nvfp4(x, payload=False)
