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
