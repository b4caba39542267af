"""Slow, obvious FP4 reference written from the format specifications, for the tests.

NumPy only (no torch arithmetic, no project code): E2M1 and E4M3 rounding by nearest grid point
with ties to the even code, NVFP4 scales following the NVFP4 recipe step by step in FP32, MXFP4
per the OCP MX v1.0 scale rule, the Sylvester Hadamard matrix by its definition.
"""

from __future__ import annotations

import math

import numpy as np

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
F32 = np.float32
FLT_MAX = np.finfo(np.float32).max


def _e4m3_grid() -> np.ndarray:
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals)


E4M3_GRID = _e4m3_grid()  # ascending; index parity == mantissa parity


def round_to_grid(a: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of the nearest grid value to each a >= 0 (ties to the even index); a beyond the
    grid saturates."""
    a = np.minimum(np.asarray(a, dtype=np.float64), grid[-1])
    d = np.abs(a[..., None] - grid)
    best = d.min(axis=-1, keepdims=True)
    cand = np.where(d == best, np.arange(len(grid)), len(grid) * 4)
    even = np.where(cand % 2 == 0, cand, len(grid) * 4)
    pick_even = even.min(axis=-1)
    return np.where(pick_even < len(grid) * 4, pick_even, cand.min(axis=-1))


def e2m1_rne(x: np.ndarray) -> np.ndarray:
    """Values of x rounded to E2M1 (RNE, saturating at ±6)."""
    return np.sign(x) * E2M1_GRID[round_to_grid(np.abs(x), E2M1_GRID)]


def e4m3_rne(x: np.ndarray) -> np.ndarray:
    return E4M3_GRID[round_to_grid(np.abs(x), E4M3_GRID)]


def nvfp4(x: np.ndarray, block=(1, 16), amax: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized values float64, decoded block scales) of a 2-D array, blocks along axis 1."""
    x = np.asarray(x, dtype=F32)
    rows, cols = x.shape
    bm, bk = block
    amax = F32(np.abs(x).max()) if amax is None else F32(amax)
    with np.errstate(divide="ignore", over="ignore"):
        s_enc = F32(min(F32(2688.0) / amax, FLT_MAX))
    s_enc = F32(1.0) if s_enc == 0 else s_enc
    s_dec = F32(F32(1.0) / s_enc)
    blocks = np.abs(x).reshape(rows // bm, bm, cols // bk, bk).max(axis=(1, 3))
    with np.errstate(over="ignore"):
        s_blk = np.minimum((blocks * (s_enc * F32(1.0 / 6.0))).astype(F32), F32(448.0))
    s_blk = e4m3_rne(s_blk).astype(F32)
    with np.errstate(divide="ignore", over="ignore"):
        enc = np.minimum(F32(1.0) / (s_blk * s_dec), FLT_MAX).astype(F32)
    enc_full = np.repeat(np.repeat(enc, bm, axis=0), bk, axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = (x * enc_full).astype(F32)
    codes = e2m1_rne(scaled)
    scale_full = np.repeat(np.repeat(s_blk.astype(np.float64), bm, axis=0), bk, axis=1)
    return codes * scale_full * float(s_dec), s_blk.astype(np.float64)


def mxfp4(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    rows, cols = x.shape
    out = np.empty_like(x)
    for r in range(rows):
        for b in range(cols // 32):
            blk = x[r, b * 32:(b + 1) * 32]
            amax = np.abs(blk).max()
            e = -127 if amax == 0 else max(math.floor(math.log2(amax)) - 2, -127)  # E8M0 floor
            scale = 2.0**e
            out[r, b * 32:(b + 1) * 32] = e2m1_rne(blk / scale) * scale
    return out


def hadamard16() -> np.ndarray:
    """Sylvester's construction: H[i, j] = (-1)^popcount(i & j)."""
    return np.array([[(-1) ** bin(i & j).count("1") for j in range(16)] for i in range(16)], float)


def rht(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """x · diag-block(diag(signs)·H16/4) along axis 1, float64."""
    h = np.diag(np.asarray(signs, float)) @ hadamard16() / 4.0
    rows, cols = x.shape
    return (np.asarray(x, np.float64).reshape(rows, cols // 16, 16) @ h).reshape(rows, cols)
