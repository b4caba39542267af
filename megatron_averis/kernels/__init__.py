"""Triton kernels for the FP4 numerics (project issue 6).

The kernels take and return plain tensors (and ints, bools, strings) and import nothing from
`megatron_averis.numerics`: the constants they share with it live in `megatron_averis.formats`.
The pure-PyTorch functions in numerics stay the reference and the test oracle; the kernels
reproduce their codes, scales and tensor scales bit for bit. numerics.backend alone decides when
a kernel runs instead of the reference, from the facts this package states here.

Triton itself is imported only when a kernel is first used (`megatron_averis.kernels.fp4`).
"""

from __future__ import annotations

import os

import torch

from megatron_averis.formats import RHT_BLOCK

# Input dtypes the quantize / amax / token-statistics kernels read.
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Output dtypes of the dequantize kernel.
DEQUANTIZE_DTYPES = (torch.bfloat16, torch.float32)
# The only Hadamard size fused into the quantize / amax kernels.
FUSED_RHT_SIGNS = RHT_BLOCK

_triton_importable: bool | None = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401

            _triton_importable = True
        except Exception:  # any failure (missing, broken CUDA toolchain) means: use the reference
            _triton_importable = False
    return _triton_importable


__all__ = [
    "DEQUANTIZE_DTYPES",
    "FUSED_RHT_SIGNS",
    "INPUT_DTYPES",
    "interpreting",
    "triton_available",
]
