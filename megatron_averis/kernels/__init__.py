"""Triton kernels for the FP4 numerics (project issue 6).

The pure-PyTorch functions in `megatron_averis.numerics` stay the reference and the test oracle;
the kernels here reproduce their codes, scales and tensor scales bit for bit and are used only
where `enabled(t)` holds:

- the tensor is on CUDA (or on the CPU while TRITON_INTERPRET=1, Triton's interpreter: how the
  kernels are tested without a GPU),
- Triton imports,
- MEGATRON_AVERIS_KERNELS is not "0" (set it to force the reference everywhere).

Triton itself is imported only when a kernel is first used (`megatron_averis.kernels.fp4`).
"""

from __future__ import annotations

import os

import torch

ENV_SWITCH = "MEGATRON_AVERIS_KERNELS"
_triton_importable: bool | None = None


def interpreting() -> bool:
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


def enabled(t: torch.Tensor) -> bool:
    """Whether numerics should hand `t` to a kernel instead of the PyTorch reference."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    dev = t.device.type
    if dev != "cuda" and not (dev == "cpu" and interpreting()):
        return False
    return triton_available()


KERNEL_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


GEMM_SWITCH = "MEGATRON_AVERIS_FP4_GEMM"
GEMM_MODES = ("dequant", "fused")
# dequant: BF16 scaled values from the dequantize kernel, then torch.mm(out_dtype=float32)
# (cuBLAS). fused: one Triton GEMM that dequantizes packed FP4 in its prologue.
DEFAULT_GEMM = "dequant"


def fused_gemm_enabled(t: torch.Tensor) -> bool:
    mode = os.environ.get(GEMM_SWITCH, DEFAULT_GEMM)
    if mode not in GEMM_MODES:
        raise ValueError(f"{GEMM_SWITCH}={mode!r}; use one of {GEMM_MODES}")
    return mode == "fused" and enabled(t)


def use_for(x: torch.Tensor) -> bool:
    """Whether a quantizer should run the kernel on the 2-D tensor `x` (else the reference)."""
    return x.dim() == 2 and x.numel() > 0 and x.dtype in KERNEL_INPUT_DTYPES and enabled(x)


__all__ = [
    "ENV_SWITCH",
    "GEMM_SWITCH",
    "KERNEL_INPUT_DTYPES",
    "enabled",
    "fused_gemm_enabled",
    "interpreting",
    "triton_available",
    "use_for",
]
