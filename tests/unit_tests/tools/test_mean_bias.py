"""Mean-bias statistics against float64 NumPy formulas and the NumPy FP4 reference."""

import math

import numpy as np
import pytest
import torch

from fp4_reference import hadamard16, nvfp4, rht
from megatron_averis.diagnostics import mean_bias as mb
from megatron_averis.numerics.hadamard import random_signs


def _biased(t=256, f=64, seed=0, mean_scale=3.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((t, f)) + mean_scale * rng.standard_normal(f)


def test_mean_norm_stats_match_float64_formulas():
    x = _biased()
    got = mb.mean_norm_stats(torch.tensor(x, dtype=torch.float32))
    x32 = x.astype(np.float32).astype(np.float64)  # the values the function sees
    mu, r = x32.mean(0), x32 - x32.mean(0)
    rms = np.sqrt((r**2).sum(1).mean())
    assert got["mean_norm"] == pytest.approx(np.linalg.norm(mu), rel=1e-12)
    assert got["residual_rms_norm"] == pytest.approx(rms, rel=1e-12)
    assert got["mean_to_residual"] == pytest.approx(np.linalg.norm(mu) / rms, rel=1e-12)
    assert got["mean_energy_share"] == pytest.approx(
        len(x32) * (mu**2).sum() / (x32**2).sum(), rel=1e-12)


@pytest.mark.parametrize("k", [1, 7, 100, 256 * 64])
def test_topk_mean_share_matches_brute_force(k):
    x = _biased(seed=1)
    mu = x.mean(0)
    order = np.argsort(-np.abs(x), axis=None)[:k]
    rows, cols = np.unravel_index(order, x.shape)
    v = x[rows, cols]
    want = (np.sign(v) * mu[cols]).sum() / np.abs(v).sum()
    got = mb.topk_mean_share(torch.tensor(x), k)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    # The decomposition |x| = sign(x)·μ + sign(x)·r: the residual's share is the rest.
    res = (np.sign(v) * (v - mu[cols])).sum() / np.abs(v).sum()
    assert got + res == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("shape", [(200, 48), (32, 96)])
def test_cos_mean_top_singular_vector_matches_numpy_svd(shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape) * np.linspace(0.5, 3, shape[1]) + 0.2 * rng.standard_normal(shape[1])
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    v1 = vt[0]
    got_v = mb.top_right_singular_vector(torch.tensor(x)).numpy()
    assert abs(abs(got_v @ v1) - 1) < 1e-9
    mu = x.mean(0)
    want = abs(mu @ v1) / np.linalg.norm(mu)
    assert mb.cos_mean_top_singular(torch.tensor(x)) == pytest.approx(want, rel=1e-9)
    assert 0 < want < 0.99  # a case where the answer is not trivially 0 or 1


def test_dynamic_range_matches_numpy_median():
    for t in (10, 11):  # even and odd numbers of blocks
        x = _biased(t=t, f=32, seed=t)
        blocks = np.abs(x).reshape(t, 2, 16).max(-1)
        want = np.abs(x).max() / np.median(blocks)
        assert mb.block_dynamic_range(torch.tensor(x)) == pytest.approx(want, rel=1e-12)


def _bf16(a):
    """float32 → BF16 (round to nearest even) → float64, by bit manipulation."""
    b = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def _grid_data(t=256, f=64, seed=3):
    """Values on a 2^-6 grid: FP32 sums, means over 2^8 tokens and 16-blocks of the Hadamard
    transform are exact, so the float64 reference sees the same μ and R as the FP32 code."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-256, 256, (t, f)) + rng.integers(-640, 640, f)) / 64.0


def test_quantization_errors_match_numpy_reference():
    x = _grid_data()
    norm = np.linalg.norm(x)
    signs = random_signs(5).numpy()

    def split_err(a):
        mu_hat = _bf16(a.mean(0))
        return nvfp4(a - mu_hat)[0] + mu_hat

    h = np.diag(signs) @ hadamard16() / 4

    def unrot(a):  # a·Hᵀ per 16-block: the inverse of rht
        return (a.reshape(len(a), -1, 16) @ h.T).reshape(a.shape)

    xr = rht(x, signs)
    want = {
        "qerr_nvfp4": np.linalg.norm(nvfp4(x)[0] - x) / norm,
        "qerr_nvfp4_split": np.linalg.norm(split_err(x) - x) / norm,
        "qerr_nvfp4_rht": np.linalg.norm(unrot(nvfp4(xr)[0]) - x) / norm,
        "qerr_nvfp4_split_rht": np.linalg.norm(unrot(split_err(xr)) - x) / norm,
    }
    got = mb.quantization_errors(torch.tensor(x, dtype=torch.float32), rht_seed=5)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k
    assert got["qerr_nvfp4_split"] < 0.5 * got["qerr_nvfp4"]  # the mean dominates this x


def test_report_on_mean_biased_and_centred_data():
    torch.manual_seed(0)
    biased = torch.randn(512, 128) + 4 * torch.randn(128)
    rep = mb.mean_bias_report(biased.bfloat16())
    assert list(rep) == list(mb.METRICS)
    assert rep["cos_mean_top_sv"] > 0.99 and rep["mean_energy_share"] > 0.9
    assert rep["topk_mean_share"] > 0.5
    assert rep["qerr_nvfp4_split"] < 0.5 * rep["qerr_nvfp4"]
    centred = torch.randn(512, 128)
    centred -= centred.mean(0)
    rep = mb.mean_bias_report(centred)
    assert rep["mean_norm"] < 1e-5 and abs(rep["topk_mean_share"]) < 1e-5
    # Nothing to split: the split changes the error by the BF16 rounding of a zero mean only.
    assert rep["qerr_nvfp4_split"] == pytest.approx(rep["qerr_nvfp4"], rel=1e-2)
    assert rep["dyn_range_split"] == pytest.approx(rep["dyn_range"], rel=1e-4)


@pytest.mark.parametrize("x, message", [
    (torch.ones(16), "2-D"),
    (torch.ones(1, 16), "at least 2 tokens"),
    (torch.tensor([[1.0] * 16, [math.inf] + [0.0] * 15]), "inf or NaN"),
])
def test_errors(x, message):
    with pytest.raises(ValueError, match=message):
        mb.mean_bias_report(x)


def test_features_not_a_multiple_of_the_block():
    with pytest.raises(ValueError, match="multiple of 16"):
        mb.mean_bias_report(torch.randn(8, 24))
    with pytest.raises(ValueError, match="topk_fraction"):
        mb.mean_bias_report(torch.randn(8, 32), topk_fraction=0)
