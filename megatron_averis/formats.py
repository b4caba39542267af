"""The constants that define the FP4 numerics, in one place for both implementations of them.

The PyTorch reference (`megatron_averis.numerics`) and the Triton kernels (`megatron_averis.kernels`)
compute the same codes, scales and random bits; each reads these values from here, so neither
depends on the other for a constant (the kernels import nothing from numerics).
"""

from __future__ import annotations

# E2M1 (FP4) elements: magnitudes by 3-bit index; 6 = 1.5·2^2, so its largest power of two
# (emax_elem in the OCP MX specification) is 2.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2

# Block scales: NVFP4 stores E4M3 (largest finite 448), MXFP4 stores E8M0 exponents (bias 127).
E4M3_MAX = 448.0
E8M0_BIAS = 127
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32

FLT_MAX = 3.4028234663852886e38  # the largest finite FP32, torch.finfo(torch.float32).max

RHT_BLOCK = 16  # the random Hadamard transform's block (and the only size the kernels fuse)

# The position-keyed stochastic-rounding stream (numerics/random.py): MurmurHash3's 32-bit
# finalizer, the row / column multipliers of the position hash, and the seed-mixing constants.
FMIX32_MUL1 = 0x85EBCA6B
FMIX32_MUL2 = 0xC2B2AE35
SR_ROW_MUL = 0x9E3779B1  # 2^32 / golden ratio: spreads consecutive rows
SR_COL_MUL = 0x85EBCA77
SEED_MIX_START = 0x243F6A88
SEED_MIX_MUL = 0x01000193
