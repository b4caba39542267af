"""The adapter's numerics, free of Transformer Engine: one tensor to its GEMM operands, and the
three GEMMs from those operands.

Everything is delegated to the code our own linear layer runs (linear.function's `_quantize` and
`_weight_operands`, numerics.qgemm) with the same LinearContext, so seeds, stochastic-rounding
positions, Hadamard signs, mean formats and TP statistics are those of QuantizedLinear /
AverisColumn/RowParallelLinear by construction. What differs is only who decides when a tensor is
quantized: TE calls a quantizer per tensor (and usage) instead of one autograd function per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_averis.linear.function import LinearContext, _quantize, _weight_operands
from megatron_averis.numerics.operand import QuantizedOperand, _store_mean, token_mean
from megatron_averis.numerics.qgemm import qgemm
from megatron_averis.te.roles import KINDS

GEMMS = ("fprop", "dgrad", "wgrad")


@dataclass
class OperandPair:
    """A tensor's operands: `rowwise` along its last dim, `columnwise` along its first."""

    rowwise: QuantizedOperand | None
    columnwise: QuantizedOperand | None


def _shared_mean(ctx: LinearContext, row_role: str, col_role: str, x2d: torch.Tensor,
                 row: QuantizedOperand | None, reducer):
    """The μ the columnwise operand reuses from the rowwise one, exactly when QuantizedLinear
    reuses it (same mean format, no rotation along the rowwise operand's GEMM). Computed the same
    way when the rowwise operand is not built in this call (TE quantizes a sequence-parallel
    input's columnwise usage in backward), so the bits do not depend on TE's call pattern."""
    a, b = ctx.recipe.operand(row_role), ctx.recipe.operand(col_role)
    if not (a.mean_split and b.mean_split and a.mean_format == b.mean_format
            and a.format != "bf16" and not ctx.recipe.rht(row_role.split("_")[0])):
        return None
    if row is not None:
        return row.mean
    return _store_mean(token_mean(x2d, 0, reducer), a.mean_format)


def quantize(ctx: LinearContext, kind: str, x2d: torch.Tensor, *, rowwise: bool, columnwise: bool,
             row_call: int, col_call: int, tokens_sharded: bool = False,
             token_offset: int = 0) -> OperandPair:
    """Operands of x2d [rows, cols] for TE slot `kind` (input | weight | grad_output).

    tokens_sharded: x2d holds this rank's tokens only (a sequence-parallel shard starting at
    global token `token_offset`): token statistics are reduced over ctx.comm's group."""
    if kind == "weight":
        w_f, w_d = _weight_operands(ctx, x2d, row_call)
        return OperandPair(w_f if rowwise else None, w_d if columnwise else None)
    row_role, col_role = KINDS[kind]
    comm = ctx.comm
    # Which dimension of this rank's tensor is split over the TP group: the input of a
    # row-parallel layer and the output gradient of a column-parallel one split features.
    feat_split = comm.distributed and ctx.mode == ("row" if kind == "input" else "column")
    if kind == "input":
        feat_off = comm.rank * x2d.shape[1] if feat_split else 0
    else:
        feat_off = ctx.out_positions(x2d.shape[1])
    first_gemm, second_gemm = row_role.split("_")[0], col_role.split("_")[0]
    common = dict(tokens_sharded=tokens_sharded, features_sharded=feat_split)
    row = col = None
    if rowwise:
        row = _quantize(ctx, row_role, x2d, row_call, mean_dim=0, offset=(token_offset, feat_off),
                        signs=ctx.signs.get(first_gemm), **common)
    if columnwise:
        shared = {}
        mean = _shared_mean(ctx, row_role, col_role, x2d, row,
                            comm.reducer(tokens_sharded, feat_split))
        if mean is not None:
            shared["mean"] = mean
        col = _quantize(ctx, col_role, x2d.t(), col_call, mean_dim=1,
                        offset=(feat_off, token_offset), signs=ctx.signs.get(second_gemm),
                        transposed=True, **common, **shared)
    return OperandPair(row, col)


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
         bias: torch.Tensor | None = None, product=None) -> torch.Tensor:
    """The GEMM in FP32 as QuantizedLinear computes it, bias added in FP32, cast to out_dtype.
    `product` replaces the residual product Â·B̂ᵀ (native FP4 GEMM, see native.py)."""
    a, b = gemm_operands(gemm, x, w)
    out = qgemm(a, b) if product is None else qgemm(a, b, product=product)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
