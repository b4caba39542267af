import numpy as np
import pytest
import torch

from fp4_reference import hadamard16, rht
from megatron_averis.numerics import blockwise_rht, hadamard_matrix, random_signs


def test_sylvester_matrix_matches_definition():
    np.testing.assert_array_equal(hadamard_matrix(16).numpy(), hadamard16())
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


def test_rht_matches_reference_and_is_orthogonal(device):
    signs = random_signs(42)
    assert set(signs.tolist()) <= {-1.0, 1.0}
    assert torch.equal(signs, random_signs(42)) and not torch.equal(signs, random_signs(43))
    x = torch.randn(8, 64, dtype=torch.float64)
    got = blockwise_rht(x.to(device), signs).cpu().double()
    np.testing.assert_allclose(got.numpy(), rht(x.numpy(), signs.numpy()), rtol=1e-6, atol=1e-6)
    back = blockwise_rht(blockwise_rht(x.to(device), signs), signs, inverse=True).cpu().double()
    np.testing.assert_allclose(back.numpy(), x.numpy(), atol=1e-5)
    h = rht(np.eye(16), signs.numpy())
    np.testing.assert_allclose(h @ h.T, np.eye(16), atol=1e-12)


def test_gemm_invariance(device):
    signs = random_signs(3)
    a, b = torch.randn(5, 48), torch.randn(7, 48)
    got = blockwise_rht(a.to(device), signs) @ blockwise_rht(b.to(device), signs).t()
    np.testing.assert_allclose(got.cpu().numpy(), (a.double() @ b.double().t()).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 16"):
        blockwise_rht(torch.randn(2, 20), signs)


@pytest.mark.parametrize("seed", [0, 42])
def test_butterfly_is_the_sylvester_matrix_product(device, seed):
    """The butterfly order computes x·diag(s)·Had16/4: exact in FP64 on integer data (every partial
    sum is representable), forward and inverse."""
    signs = random_signs(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2**20, 2**20, (24, 64), generator=g).double()
    h = signs.double().view(16, 1) * hadamard_matrix(16, torch.float64) / 4
    want = (x.view(-1, 16) @ h).view(x.shape)
    got = blockwise_rht(x.to(device), signs)
    assert got.dtype == torch.float64 and torch.equal(got.cpu(), want)
    back = blockwise_rht(x.to(device), signs, inverse=True)
    assert torch.equal(back.cpu(), (x.view(-1, 16) @ h.t()).view(x.shape))
    assert torch.equal(blockwise_rht(got, signs, inverse=True).cpu(), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_butterfly_matches_the_fp32_matrix_within_rounding(device, dtype):
    """FP32 (BF16 input: FP32) result against x @ diag(s)·Had16/4 as a matrix product: only the summation order differs, so
    both are within a few ulps of the sum's magnitude of the FP64 value."""
    signs = random_signs(7)
    x = torch.randn(33, 96).to(dtype)
    got = blockwise_rht(x.to(device), signs)
    assert got.dtype == torch.float32
    h = signs.view(16, 1) * hadamard_matrix(16) / 4
    mat = (x.float().view(-1, 16) @ h).view(x.shape)
    exact = (x.double().view(-1, 16) @ h.double()).view(x.shape)
    bound = 4 * torch.finfo(torch.float32).eps * (x.double().abs().view(-1, 16).sum(1) / 4)
    bound = bound.repeat_interleave(16).view(x.shape)
    assert ((got.cpu().double() - exact).abs() <= bound).all()
    assert ((mat.double() - exact).abs() <= bound).all()
