"""Random Hadamard transform (RHT) over 16-element blocks of the last dimension.

H = diag(s) · Had16 / 4 with a seeded random sign vector s; H is orthogonal, so for two operands
rotated along their shared reduction dimension (A·H)(B·H)ᵀ = A·Bᵀ. The same convention as
Transformer Engine's reference (rows of the Sylvester matrix scaled by the signs).

blockwise_rht computes x·H with a specified operation order instead of a matrix product (whose
summation order is the BLAS library's): signs (exact), the fast Walsh-Hadamard butterfly, then
the 1/4 scale (exact). The quantization kernels (kernels/fp4.py) run the same FP32 operations in
registers, so a rotation fused into them reproduces these bits.
"""

from __future__ import annotations

import torch

from megatron_averis.formats import RHT_BLOCK


def hadamard_matrix(n: int = RHT_BLOCK, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (entries ±1)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_signs(seed: int, n: int = RHT_BLOCK) -> torch.Tensor:
    """A ±1 vector drawn from a CPU generator, so every device and rank gets the same signs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def _butterfly(x: torch.Tensor, n: int) -> torch.Tensor:
    """x·Had_n per n-block of the last dimension (Sylvester order) by the fast Walsh-Hadamard
    transform: stages h = 1, 2, 4, ..., n/2 map each pair (i, i+h) of a block to (a+b, a-b)."""
    shape = x.shape
    h = 1
    while h < n:
        v = x.reshape(-1, n // (2 * h), 2, h)
        a, b = v[:, :, 0], v[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return x.reshape(shape)


def blockwise_rht(x: torch.Tensor, signs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x·H per 16-block of the last dimension, in FP32 (FP64 for FP64 x); x·Hᵀ with inverse.

    Order (the fused kernels reproduce it): x·H = butterfly(x ⊙ s)·(1/4) and x·Hᵀ =
    butterfly(x)·(1/4) ⊙ s. Multiplying by ±1 and by 1/4 is exact (barring underflow), so only
    the butterfly's additions round."""
    n = signs.numel()
    if x.shape[-1] % n:
        raise ValueError(
            f"the Hadamard transform needs the last dimension ({x.shape[-1]}) divisible by {n}"
        )
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = signs.to(device=x.device, dtype=dtype)
    y = x.to(dtype).reshape(-1, n)
    if not inverse:
        y = y * s
    y = _butterfly(y, n) * (1.0 / n**0.5)
    if inverse:
        y = y * s
    return y.reshape(x.shape)
