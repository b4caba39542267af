"""Position-keyed random numbers for stochastic rounding.

Each element's uniform draw is a hash of (seed, global row, global column) rather than the next
value of a sequential generator. So the draw an element gets does not depend on how a tensor is
split: a sequence-parallel shard that knows its global offset gets the bits the whole tensor would
have, which keeps TP=2+SP bit-identical to TP=1 under stochastic rounding, and a GPU kernel can
reproduce the stream exactly. The hash is the 32-bit MurmurHash3 finalizer applied twice.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROW_MUL = 0x9E3779B1  # 2^32 / golden ratio: spreads consecutive rows
_COL_MUL = 0x85EBCA77


def fmix32(h):
    """MurmurHash3's 32-bit finalizer on int64 tensors (or Python ints) holding uint32 values.

    Products of two uint32 values can exceed int64's range; the wrap keeps the low 32 bits,
    which are all that is used."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def mix_seed(*parts: int) -> int:
    """Combine integers (base seed, layer id, call counter, operand role) into one 32-bit seed."""
    h = 0x243F6A88
    for p in parts:
        h = fmix32((h ^ (int(p) & _M32)) * 0x01000193 & _M32)
    return h


def _positions(where, n: int, device) -> torch.Tensor:
    """Global indices of n consecutive local indices: an int offset, or explicit indices (for
    shards that are not one contiguous range, e.g. the [gate, up] halves of a SwiGLU shard)."""
    if isinstance(where, torch.Tensor):
        if where.numel() != n:
            raise ValueError(f"{where.numel()} global indices given for {n} local ones")
        return where.to(device=device, dtype=torch.int64)
    return torch.arange(where, where + n, device=device, dtype=torch.int64)


def position_uniform(
    shape: tuple[int, int], seed: int, offset=(0, 0), device=None
) -> torch.Tensor:
    """U[0, 1) FP32 draws with 24 random bits for the elements of a [rows, cols] tensor whose
    element (r, c) sits at global position (offset[0] + r, offset[1] + c) of the full tensor;
    either entry of `offset` may instead be a tensor of global indices."""
    rows, cols = shape
    key = fmix32(int(seed) & _M32)
    r = _positions(offset[0], rows, device).view(rows, 1)
    c = _positions(offset[1], cols, device).view(1, cols)
    hr = fmix32((r * _ROW_MUL + key) & _M32)
    h = fmix32((hr ^ ((c * _COL_MUL) & _M32)) ^ key)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
