"""The quantized linear against float64 autograd and a NumPy re-implementation of each recipe."""

import numpy as np
import pytest
import torch

import fp4_reference as ref
from megatron_averis.linear import QuantizedLinear
from megatron_averis.recipes import RecipeError, get_recipe


def _data(t, k, n, seed=0, mean=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) + mean * torch.randn(k, generator=g)
    gy = torch.randn(t, n, generator=g) * 0.1 + 0.05 * mean * torch.randn(n, generator=g)
    return x, gy


def _run(layer, x, gy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(gy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad if layer.bias is not None else None


def _float64_reference(w, b, x, gy):
    w64 = w.detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    y = torch.nn.functional.linear(x64, w64, b.detach().double())
    y.backward(gy.double())
    return y.detach(), x64.grad, w64.grad


@pytest.mark.parametrize("shape", [(6, 4, 32), (24, 32)])
def test_bf16_recipe_is_exactly_f_linear(device, shape):
    layer = QuantizedLinear(32, 48, recipe="bf16", device=device)
    x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
    gy = torch.randn(*shape[:-1], 48, device=device, dtype=torch.bfloat16)
    y, dx, dw, db = _run(layer, x, gy)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    yr = torch.nn.functional.linear(xr, w, b)
    yr.backward(gy)
    assert torch.equal(y, yr) and torch.equal(dx, xr.grad) and torch.equal(dw, w.grad) and torch.equal(db, b.grad)


def test_bf16_recipe_against_float64_autograd(device):
    layer = QuantizedLinear(64, 32, recipe="bf16", device=device)
    x, gy = _data(48, 64, 32)
    x, gy = x.to(device, torch.bfloat16), gy.to(device, torch.bfloat16)
    y, dx, dw, _ = _run(layer, x, gy)
    yr, dxr, dwr = _float64_reference(layer.weight, layer.bias, x, gy)
    for got, want in ((y, yr), (dx, dxr), (dw, dwr)):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 8e-3, rel  # BF16 output rounding (2^-9) plus BF16-accumulated GEMM


def _ref_nvfp4(a):
    return ref.nvfp4(np.asarray(a, np.float32))[0]


def _ref_split(a, axis):
    """μ̂ (FP32 mean rounded to BF16) and R̂ = NVFP4(a - μ̂) along axis 1."""
    a = np.asarray(a, np.float32)
    mu = torch.from_numpy(a).sum(axis) / torch.tensor(float(a.shape[axis]))
    mu = mu.to(torch.bfloat16).double().numpy()
    m = mu.astype(np.float32)
    r = a - (m[None, :] if axis == 0 else m[:, None])
    return mu, _ref_nvfp4(r)


def _recipe_reference(name, x, w, b, gy, signs=None):
    """Y, dX, dW of recipe `name` (its gradients with RNE) from fp4_reference, in float64."""
    x, w, gy = x.numpy(), w.numpy(), gy.numpy()
    t = x.shape[0]
    w_hat = ref.nvfp4(w, (16, 16))[0]
    if name == "averis":
        mu_x, rx = _ref_split(x, 0)
        mu_g, rg = _ref_split(gy, 0)
        y = rx @ w_hat.T + (w_hat @ mu_x)[None, :]
        dx = rg @ w_hat + (w_hat.T @ mu_g)[None, :]
        _, rgt = _ref_split(gy.T, 1)
        _, rxt = _ref_split(x.T, 1)
        dw = rgt @ rxt.T + t * np.outer(mu_g, mu_x)
    else:  # nvfp4: wgrad operands rotated along tokens
        y = _ref_nvfp4(x) @ w_hat.T
        dx = _ref_nvfp4(gy) @ w_hat
        gt = ref.rht(gy.T, signs).astype(np.float32)
        xt = ref.rht(x.T, signs).astype(np.float32)
        dw = _ref_nvfp4(gt) @ _ref_nvfp4(xt).T
    return y + b.numpy()[None, :], dx, dw


@pytest.mark.parametrize("name", ["averis", "nvfp4"])
def test_fp4_recipe_matches_numpy_reference(device, name):
    recipe = get_recipe(name, ["grads.rounding=rne"])
    layer = QuantizedLinear(64, 48, recipe=recipe, device=device, dtype=torch.float32)
    x, gy = _data(64, 64, 48, seed=1)
    y, dx, dw, db = _run(layer, x.to(device), gy.to(device))
    signs = layer.ctx.signs["wgrad"].numpy() if name == "nvfp4" else None
    yr, dxr, dwr = _recipe_reference(name, x, layer.weight.detach().cpu(), layer.bias.detach().cpu(), gy, signs)
    for got, want in ((y, yr), (dx, dxr), (dw, dwr)):
        got = got.cpu().double().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(db.cpu().numpy(), gy.sum(0).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["nvfp4-plain", "nvfp4", "averis", "averis-rht", "mxfp4"])
def test_fp4_error_is_bounded(device, name):
    """Stated bound: relative error of Y, dX, dW below 0.25 on mean-biased gaussian data."""
    layer = QuantizedLinear(128, 64, recipe=name, device=device, dtype=torch.float32)
    x, gy = _data(128, 128, 64, seed=2)
    got = _run(layer, x.to(device), gy.to(device))[:3]
    want = _float64_reference(layer.weight.cpu(), layer.bias.cpu(), x, gy)
    for g, w in zip(got, want):
        rel = ((g.cpu().double() - w).norm() / w.norm()).item()
        assert rel < 0.25, (name, rel)


def test_averis_beats_vanilla_on_mean_biased_data(device):
    errs = {}
    for name in ("nvfp4", "averis"):
        torch.manual_seed(0)
        layer = QuantizedLinear(256, 128, recipe=name, device=device, dtype=torch.float32)
        x, gy = _data(256, 256, 128, seed=3, mean=6.0)
        got = _run(layer, x.to(device), gy.to(device))[:3]
        want = _float64_reference(layer.weight.cpu(), layer.bias.cpu(), x, gy)
        errs[name] = [((g.cpu().double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    for a, v in zip(errs["averis"], errs["nvfp4"]):
        assert a < v, errs


def test_shape_errors_before_work():
    with pytest.raises(RecipeError, match="in_features=100"):
        QuantizedLinear(100, 64, recipe="averis")
    layer = QuantizedLinear(64, 64, recipe="averis", dtype=torch.float32)
    with pytest.raises(RecipeError, match="24 tokens"):
        layer(torch.randn(24, 64))
    with pytest.raises(ValueError, match="input features"):
        layer(torch.randn(32, 48))


def _metis(a):
    """The Averis authors' quantizer, float64: me + Q(a - me), me the FP32 mean over tokens
    (rows), Q NVFP4 with 1x16 blocks along features and RNE."""
    a = np.asarray(a, np.float32)
    me = a.astype(np.float64).mean(0).astype(np.float32)
    return me.astype(np.float64)[None, :] + _ref_nvfp4(a - me[None, :])


def test_averis_paper_matches_the_authors_formula(device):
    """averis-paper (gradients with RNE here, so the reference is deterministic): X̂, Ŵ, Ĝ are
    quantized once along features and reused: Y = X̂Ŵᵀ, dX = ĜŴ, dW = ĜᵀX̂."""
    recipe = get_recipe("averis-paper", ["grads.rounding=rne"])
    layer = QuantizedLinear(64, 48, recipe=recipe, device=device, dtype=torch.float32)
    x, gy = _data(64, 64, 48, seed=4)
    y, dx, dw, _ = _run(layer, x.to(device), gy.to(device))
    w = layer.weight.detach().cpu().numpy()
    x_hat, g_hat, w_hat = _metis(x.numpy()), _metis(gy.numpy()), _ref_nvfp4(w)
    b = layer.bias.detach().cpu().double().numpy()
    for got, want in ((y, x_hat @ w_hat.T + b[None, :]), (dx, g_hat @ w_hat), (dw, g_hat.T @ x_hat)):
        got = got.cpu().double().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_averis_paper_reuses_one_stochastic_quantization_of_g(device):
    """With SR the same Ĝ (and X̂, Ŵ) must enter dgrad and wgrad: the products of the observed
    operands, composed in float64, give dX and dW."""
    seen = {}
    layer = QuantizedLinear(64, 48, recipe="averis-paper", device=device, dtype=torch.float32)
    layer.ctx.observer = lambda role, op: seen.__setitem__(role, op.dequantize().cpu())
    x, gy = _data(64, 64, 48, seed=5)
    _, dx, dw, _ = _run(layer, x.to(device), gy.to(device))
    g_hat, x_hat, w_hat = seen["dgrad_grad"], seen["fprop_input"], seen["fprop_weight"]
    assert torch.equal(seen["wgrad_grad"], g_hat.t()) and torch.equal(seen["wgrad_input"], x_hat.t())
    assert torch.equal(seen["dgrad_weight"], w_hat.t())
    assert not torch.equal(g_hat, torch.from_numpy(_metis(gy.numpy())))  # SR, not RNE
    for got, want in ((dx, g_hat @ w_hat), (dw, g_hat.t() @ x_hat)):
        np.testing.assert_allclose(got.cpu().double().numpy(), want.numpy(), rtol=0,
                                   atol=1e-5 * want.abs().max().item())
