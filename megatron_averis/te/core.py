"""The adapter's GEMMs, free of Transformer Engine.

Operands come from the linear layer's public per-role quantizer (linear.operands.quantize_tensor)
with the layer's LinearContext, so seeds, stochastic-rounding positions, Hadamard signs, mean
formats and the TP statistics rule are those of QuantizedLinear / AverisColumn/RowParallelLinear
by construction; the GEMMs are numerics.qgemm. What differs is only who decides when a tensor is
quantized: TE calls a quantizer per tensor (and usage) instead of one autograd function per layer.
"""

from __future__ import annotations

import torch

from megatron_averis.linear.operands import OperandPair
from megatron_averis.numerics.operand import QuantizedOperand
from megatron_averis.numerics.qgemm import qgemm

GEMMS = ("fprop", "dgrad", "wgrad")


def gemm_operands(gemm: str, x: OperandPair, w: OperandPair) -> tuple[QuantizedOperand, QuantizedOperand]:
    """The (A, B) of C = A·Bᵀ for TE's GEMM types. TE hands a custom GEMM its operands as
    (x, w) = (input, weight) for fprop, (grad, weight) for dgrad and (grad, input) for wgrad."""
    if gemm == "fprop":
        pair = (x.rowwise, w.rowwise)
    elif gemm == "dgrad":
        pair = (x.rowwise, w.columnwise)
    elif gemm == "wgrad":
        pair = (x.columnwise, w.columnwise)
    else:
        raise ValueError(f"unknown GEMM {gemm!r}; expected one of {GEMMS}")
    if pair[0] is None or pair[1] is None:
        raise RuntimeError(f"{gemm} GEMM: an operand's usage was not quantized (rowwise/columnwise "
                           "usage dropped before the GEMM)")
    return pair


def gemm(gemm: str, x: OperandPair, w: OperandPair, out_dtype: torch.dtype,
         bias: torch.Tensor | None = None, product=None, fp4_gemm: str = "dequant") -> torch.Tensor:
    """The GEMM in FP32 as QuantizedLinear computes it, bias added in FP32, cast to out_dtype.
    `product` replaces the residual product Â·B̂ᵀ (native FP4 GEMM, see native.py); fp4_gemm is
    the recipe's GEMM path."""
    a, b = gemm_operands(gemm, x, w)
    out = qgemm(a, b, fp4_gemm=fp4_gemm) if product is None else qgemm(a, b, product=product)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
