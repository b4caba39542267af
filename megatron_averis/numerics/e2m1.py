"""FP4 E2M1 element codec: 4-bit codes (sign bit 3, magnitude index bits 0-2), packed two per byte.

Magnitudes by index: 0, 0.5, 1, 1.5, 2, 3, 4, 6. Inputs are values that were already divided by
their block scale; anything beyond ±6 saturates to ±6 (the block scale is chosen so that only
E4M3 scale rounding can push a value slightly past 6).
"""

from __future__ import annotations

import torch

from megatron_averis.formats import E2M1_MAGNITUDES, E2M1_MAX

ROUNDING_MODES = ("rne", "stochastic")

# Midpoint between magnitude index i and i+1. Round-to-nearest-even sends a tie to the even index
# (even index = mantissa bit 0), so the comparison is strict where the lower index is even and
# inclusive where it is odd.
_RNE_STEPS = ((0.25, True), (0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False), (5.0, True))


def _magnitude_table(device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(E2M1_MAGNITUDES, device=device, dtype=dtype)


def _rne_index(a: torch.Tensor) -> torch.Tensor:
    idx = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for mid, strict in _RNE_STEPS:
        idx += (a > mid) if strict else (a >= mid)
    return idx


def _stochastic_index(a: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    # Index of the largest grid value <= a, then round up with probability equal to the
    # distance to that value over the gap: E[decoded] == a for every a in [0, 6].
    lo = torch.zeros(a.shape, dtype=torch.long, device=a.device)
    for v in E2M1_MAGNITUDES[1:]:
        lo += a >= v
    table = _magnitude_table(a.device)
    hi = torch.clamp(lo + 1, max=len(E2M1_MAGNITUDES) - 1)
    lo_v, hi_v = table[lo], table[hi]
    gap = torch.where(hi > lo, hi_v - lo_v, torch.ones_like(lo_v))
    p_up = (a - lo_v) / gap
    return (lo + (uniform < p_up).long()).to(torch.uint8)


def encode_e2m1(
    x: torch.Tensor, rounding: str = "rne", uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """Round scaled values to E2M1 and return one uint8 code (0..15) per element.

    Stochastic rounding needs `uniform`: one U[0, 1) draw per element (see random.py).
    NaN encodes as +0 (its block's scale carries the NaN, see blockscale); -0.0 encodes as +0 and
    a negative value that rounds to zero as -0 (code 8), as Transformer Engine does.
    """
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDING_MODES}")
    x = x.float()
    a = torch.clamp(x.abs(), max=E2M1_MAX)
    if rounding == "rne":
        idx = _rne_index(a)
    else:
        if uniform is None or uniform.shape != x.shape:
            raise ValueError("stochastic rounding needs one uniform draw per element (`uniform`)")
        idx = _stochastic_index(a, uniform)
    return idx | ((x < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact values of uint8 E2M1 codes (code 8 decodes to -0.0)."""
    mags = _magnitude_table(codes.device, dtype)
    table = torch.cat([mags, -mags])
    return table[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes two per byte along the last dimension: element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of FP4 codes per row")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_fp4."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
