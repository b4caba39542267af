"""Which implementation runs an FP4 operation: a Triton kernel or the PyTorch reference.

This module is the only place that decides. Every numerics call site asks one of the
`*_kernels` functions below; each returns the kernel module (`megatron_averis.kernels.fp4`) when
the kernel should run, else None (run the reference). A kernel runs when

- the tensor is on CUDA (or on the CPU while TRITON_INTERPRET=1, Triton's interpreter: how the
  kernels are tested without a GPU),
- Triton imports,
- the kernels are switched on: MEGATRON_AVERIS_KERNELS=0 in the environment when this module is
  first imported switches them off for the process (a debug switch; `reference_only()` does the
  same inside a block),
- the kernel handles the case (input dtype, RHT size, number of GEMM terms, shape).

The kernels reproduce the reference bit for bit, so this choice never changes a result. The two
choices that do are not made here: the order of the token sums behind every mean (`token_sum`)
and the GEMM path (`fp4_gemm`) are recipe fields (Recipe.token_sum / Recipe.fp4_gemm, the
trainer's --fp4-token-sum / --fp4-gemm) that the linear layers hand to quantize_operand and
qgemm. Their former environment variables are refused when this module is imported.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType

import torch

from megatron_averis import kernels

KERNELS_SWITCH = "MEGATRON_AVERIS_KERNELS"

# token_sum: "torch" (torch.sum; its order is the device's and the library's) or "pairwise"
# (operand.pairwise_sum: a specified order, the same on every device, which the GPU stats kernel
# reproduces bit for bit in the same pass that finds the residual's range).
TOKEN_SUMS = ("torch", "pairwise")
# fp4_gemm: "dequant" (BF16 scaled values from the dequantize kernel, then cuBLAS with FP32
# accumulation), "fused" (one Triton GEMM that dequantizes packed FP4 in its prologue; its FP32
# sums run in another order than cuBLAS's), "native" (the FP4 tensor cores through Transformer
# Engine's GEMM: the TE route on sm_100+, te/native.py; refused elsewhere) or "auto" (native
# where the TE route runs on such a GPU, else dequant). Numerics treat native/auto as dequant:
# only the TE adapter substitutes the hardware product.
FP4_GEMMS = ("dequant", "fused", "native", "auto")

# Environment variables that used to choose result-changing paths on every call -> (the recipe
# field, the trainer flag) that replaces each.
LEGACY_SWITCHES = {
    "MEGATRON_AVERIS_TOKEN_SUM": ("token_sum", "--fp4-token-sum"),
    "MEGATRON_AVERIS_FP4_GEMM": ("fp4_gemm", "--fp4-gemm"),
    "MEGATRON_AVERIS_TE_GEMM": ("fp4_gemm", "--fp4-gemm"),
}
# Old values that the field spells differently.
LEGACY_VALUES = {"emulated": "dequant"}


def check_legacy_environment(environ=os.environ) -> None:
    """Refuse the retired switches: a run must record what changes its results in its config."""
    for var, (field, flag) in LEGACY_SWITCHES.items():
        if var in environ:
            value = LEGACY_VALUES.get(environ[var], environ[var])
            raise RuntimeError(
                f"{var}={environ[var]!r} is no longer read: it changes results, so it is now the "
                f"recipe field `{field}`, recorded in the run's config. Unset {var} and pass "
                f"{flag} {value} to the trainer, --fp4-recipe-override {field}={value}, or "
                f"get_recipe(name, ['{field}={value}']) from Python (docs/performance.md, Switches)")


check_legacy_environment()


def check_choice(field: str, value: str) -> None:
    """A clear error for an unknown token_sum / fp4_gemm value."""
    choices = {"token_sum": TOKEN_SUMS, "fp4_gemm": FP4_GEMMS}[field]
    if value not in choices:
        raise ValueError(f"{field}={value!r} is unknown; choose one of {choices}")


_switched_on = os.environ.get(KERNELS_SWITCH, "1") != "0"


def kernels_switched_on() -> bool:
    return _switched_on


@contextlib.contextmanager
def reference_only():
    """Run the PyTorch reference everywhere inside the block (tests, benchmarks' reference)."""
    global _switched_on
    before, _switched_on = _switched_on, False
    try:
        yield
    finally:
        _switched_on = before


def kernels_for(t: torch.Tensor) -> ModuleType | None:
    """The kernel module if kernels may run on `t`'s device, else None."""
    if not _switched_on:
        return None
    dev = t.device.type
    if dev != "cuda" and not (dev == "cpu" and kernels.interpreting()):
        return None
    if not kernels.triton_available():
        return None
    from megatron_averis.kernels import fp4

    return fp4


def operand_kernels(x: torch.Tensor, signs: torch.Tensor | None = None) -> ModuleType | None:
    """For quantizing, the amax and the token statistics of a 2-D operand `x` (rotated by
    `signs` if given): the kernels read the float dtypes they know and fuse the 16-sign RHT only."""
    if x.dim() != 2 or x.numel() == 0 or x.dtype not in kernels.INPUT_DTYPES:
        return None
    if signs is not None and signs.numel() != kernels.FUSED_RHT_SIGNS:
        return None
    return kernels_for(x)


def range_kernels(lo: torch.Tensor) -> ModuleType | None:
    """For the residual amax from the stats pass's per-feature FP32 (min, max) vectors."""
    return kernels_for(lo) if lo.dim() == 1 and lo.dtype == torch.float32 else None


def dequantize_kernels(data: torch.Tensor, dtype: torch.dtype) -> ModuleType | None:
    """For code × block scale of packed FP4 `data`, written as `dtype`."""
    return kernels_for(data) if dtype in kernels.DEQUANTIZE_DTYPES else None


def epilogue_kernels(product: torch.Tensor, n_terms: int) -> ModuleType | None:
    """For the tensor scale and `n_terms` mean terms applied to an FP32 GEMM product."""
    fp4 = kernels_for(product)
    return fp4 if fp4 is not None and n_terms <= fp4.MAX_TERMS else None


def fused_gemm_kernels(a, b, n_terms: int, fp4_gemm: str) -> ModuleType | None:
    """For the whole GEMM from packed FP4 QuantizedTensors a [M, K], b [N, K] under
    fp4_gemm="fused", when the kernel covers their formats and K and both carry the packed
    payload (a GEMM-only operand holds its BF16 scaled values instead)."""
    if fp4_gemm != "fused" or a.fmt != b.fmt or a.block[1] != b.block[1]:
        return None
    if not (a.has_payload and b.has_payload):
        return None
    fp4 = kernels_for(a.data)
    if fp4 is None or n_terms > fp4.MAX_TERMS or not fp4.gemm_supported(a.shape[1]):
        return None
    return fp4


__all__ = [
    "FP4_GEMMS",
    "KERNELS_SWITCH",
    "LEGACY_SWITCHES",
    "TOKEN_SUMS",
    "check_choice",
    "check_legacy_environment",
    "dequantize_kernels",
    "epilogue_kernels",
    "fused_gemm_kernels",
    "kernels_for",
    "kernels_switched_on",
    "operand_kernels",
    "reference_only",
]
