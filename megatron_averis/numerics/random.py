"""Position-keyed random numbers for stochastic rounding.

Each element's uniform draw is a hash of (seed, global row, global column) rather than the next
value of a sequential generator. So the draw an element gets does not depend on how a tensor is
split: a sequence-parallel shard that knows its global offset gets the bits the whole tensor would
have, which keeps TP=2+SP bit-identical to TP=1 under stochastic rounding, and a GPU kernel can
reproduce the stream exactly. The hash is the 32-bit MurmurHash3 finalizer applied twice.

A seed is an int, or a StepSeed whose last part (the training step) lives in device memory: a
CUDA graph captured once then draws new bits at every replay, and eager and graphed runs draw the
same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_averis.formats import (
    FMIX32_MUL1,
    FMIX32_MUL2,
    SEED_MIX_MUL,
    SEED_MIX_START,
    SR_COL_MUL,
    SR_ROW_MUL,
)

_M32 = 0xFFFFFFFF


def fmix32(h):
    """MurmurHash3's 32-bit finalizer on int64 tensors (or Python ints) holding uint32 values.

    Products of two uint32 values can exceed int64's range; the wrap keeps the low 32 bits,
    which are all that is used."""
    h = h ^ (h >> 16)
    h = (h * FMIX32_MUL1) & _M32
    h = h ^ (h >> 13)
    h = (h * FMIX32_MUL2) & _M32
    return h ^ (h >> 16)


def fold_seed(h, part):
    """One step of mix_seed: h and part are ints or int64 tensors holding uint32 values."""
    return fmix32((h ^ (part & _M32)) * SEED_MIX_MUL & _M32)


def mix_seed(*parts: int) -> int:
    """Combine integers (base seed, layer id, call counter, operand role) into one 32-bit seed."""
    h = SEED_MIX_START
    for p in parts:
        h = fold_seed(h, int(p))
    return h


@dataclass(frozen=True, eq=False)
class StepSeed:
    """The seed mix_seed(*parts, step) given as base = mix_seed(*parts) and `step`, a one-element
    int64 tensor on the operand's device read only where the bits are drawn (the kernels load it;
    nothing synchronizes with the host)."""

    base: int
    step: torch.Tensor

    def resolve(self) -> torch.Tensor:
        """The seed as a one-element int64 tensor on the step's device."""
        return fold_seed(self.base & _M32, self.step.reshape(1).to(torch.int64))


def seed_key(seed) -> int | torch.Tensor:
    """fmix32 of the seed: the key every position hash starts from."""
    if isinstance(seed, StepSeed):
        return fmix32(seed.resolve())
    return fmix32(int(seed) & _M32)


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
    either entry of `offset` may instead be a tensor of global indices. `seed`: int or StepSeed."""
    rows, cols = shape
    key = seed_key(seed)
    if isinstance(key, torch.Tensor):
        key = key.to(device)
    r = _positions(offset[0], rows, device).view(rows, 1)
    c = _positions(offset[1], cols, device).view(1, cols)
    hr = fmix32((r * SR_ROW_MUL + key) & _M32)
    h = fmix32((hr ^ ((c * SR_COL_MUL) & _M32)) ^ key)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
