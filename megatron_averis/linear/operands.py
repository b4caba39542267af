"""The linear layer's per-role quantizer: how this rank's part of X, W or G becomes the GEMM
operand of a recipe role. QuantizedLinear (function.py) and the Transformer Engine adapter
(te/) both call it, so the rules below are written once.

Tensors and their roles (recipes.OPERAND_ROLES); "rowwise" is blocked along the tensor's last
dimension, "columnwise" along its first (the operand is the transpose):

    tensor        rowwise                  columnwise
    input         fprop_input  X [T, K]    wgrad_input  Xᵀ [K, T]
    weight        fprop_weight W [N, K]    dgrad_weight Wᵀ [K, N]
    grad_output   dgrad_grad   G [T, N]    wgrad_grad   Gᵀ [N, T]

Statistics across tensor-parallel ranks. A rank quantizes its part with the statistics of the
whole tensor: the residual amax is all-reduced (max) whenever the tensor is split over the TP
group, the column sums and token count behind μ (sum) only when its tokens are split (a
sequence-parallel shard); μ is per feature, so a feature split needs no reduction. Features are
split for X of a row-parallel layer, G of a column-parallel one and W of both. Each element also
gets its global position (stochastic-rounding bits, see numerics.random).

Reuse between the two operands of one tensor. The columnwise operand takes the rowwise one's
stored μ̂ and its FP32 form when both split the mean in the same format and the rowwise operand
is not rotated (its μ̂ is then the mean of the tensor itself; when only the columnwise operand is
asked for, μ̂ is computed the same way, so the bits do not depend on who asks when). It takes
the residual amax too when both then quantize the same residual in NVFP4 without rotation (the
amax of a tensor and its transpose are equal, so this only saves a pass).

What is kept of an operand (`output`, numerics.operand.OUTPUTS). An operand that a GEMM consumes
at once is asked for as "values": the quantize kernel writes the BF16 GEMM operand in its pass
and no packed payload. One that is saved for backward or communicated keeps its payload
("payload", or "both" when it also feeds a GEMM now); operand_output() says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_averis.linear.context import LinearContext
from megatron_averis.numerics.operand import QuantizedOperand, store_mean, quantize_operand, token_mean

TENSOR_ROLES = {
    "input": ("fprop_input", "wgrad_input"),
    "weight": ("fprop_weight", "dgrad_weight"),
    "grad_output": ("dgrad_grad", "wgrad_grad"),
}
# The parallel mode in which a tensor's features are split over the TP group.
_FEATURE_SPLIT_MODE = {"input": "row", "grad_output": "column"}


@dataclass
class OperandPair:
    """A tensor's operands: `rowwise` along its last dim, `columnwise` along its first."""

    rowwise: QuantizedOperand | None
    columnwise: QuantizedOperand | None


@dataclass(frozen=True)
class Placement:
    """Where this rank's part [tokens, features] of an activation or gradient lies in the whole."""

    tokens_sharded: bool
    features_sharded: bool
    token_offset: int
    feature_offset: int | torch.Tensor

    @classmethod
    def of(cls, ctx: LinearContext, tensor: str, x2d: torch.Tensor,
           tokens_sharded: bool) -> "Placement":
        comm = ctx.comm
        tokens_sharded = tokens_sharded and comm.distributed
        features_sharded = comm.distributed and ctx.mode == _FEATURE_SPLIT_MODE[tensor]
        if tensor == "input":
            feature_offset = comm.rank * x2d.shape[1] if features_sharded else 0
        else:  # output features: a strided column shard is not one contiguous range
            feature_offset = ctx.out_positions(x2d.shape[1])
        return cls(tokens_sharded, features_sharded,
                   comm.rank * x2d.shape[0] if tokens_sharded else 0, feature_offset)

    def reducer(self, ctx: LinearContext):
        return ctx.comm.reducer(self.tokens_sharded, self.features_sharded)


def operand_output(ctx: LinearContext, *, gemm_now: bool, kept: bool) -> str:
    """What to keep of an operand: "values" for a GEMM that reads it now, the payload where it
    is kept (saved for backward, communicated, transposed), "both" for both. The fused GEMM
    (recipe field fp4_gemm="fused") reads packed FP4, so it takes the payload alone."""
    if not gemm_now or ctx.recipe.fp4_gemm == "fused":
        return "payload"
    return "both" if kept else "values"


def _quantize(ctx: LinearContext, role: str, x: torch.Tensor, call: int, reducer, *,
              mean_dim: int | None, offset: tuple, transposed: bool = False,
              output: str = "payload", **shared) -> QuantizedOperand:
    o = ctx.recipe.operand(role)
    if o.format == "bf16":
        return quantize_operand(x, "bf16", transposed=transposed)
    return quantize_operand(
        x,
        o.format,
        block=o.block,
        rounding=o.rounding,
        mean_dim=mean_dim if o.mean_split else None,
        mean_format=o.mean_format,
        signs=ctx.signs.get(role.split("_")[0]),  # CPU: the kernels take them as a bit mask
        sr_seed=ctx.seed(role, call, x.device) if o.rounding == "stochastic" else None,
        rng_offset=offset,
        reducer=reducer,
        transposed=transposed,
        token_sum=ctx.recipe.token_sum,
        output=output,
        **shared,
    )


def _reused_stats(ctx: LinearContext, tensor: str, x2d: torch.Tensor, reducer,
                  first: QuantizedOperand | None) -> dict:
    """What the columnwise operand takes from the rowwise one (module docstring)."""
    row_role, col_role = TENSOR_ROLES[tensor]
    r = ctx.recipe
    a, b = r.operand(row_role), r.operand(col_role)
    row_rotated, col_rotated = r.rht(row_role.split("_")[0]), r.rht(col_role.split("_")[0])
    shared = {}
    if (a.quantized and a.mean_split and b.mean_split and a.mean_format == b.mean_format
            and not row_rotated):
        if first is not None:
            shared.update(mean=first.mean, mean_fp32=first.mean_fp32())
        else:
            shared["mean"] = store_mean(token_mean(x2d, 0, reducer, token_sum=r.token_sum),
                                        a.mean_format)
    same_residual = "mean" in shared or (not a.mean_split and not b.mean_split)
    if (first is not None and first.amax is not None and same_residual and b.format == "nvfp4"
            and not row_rotated and not col_rotated):
        shared["amax"] = first.amax
    return shared


def quantize_role(ctx: LinearContext, role: str, x2d: torch.Tensor, call: int, *,
                  tokens_sharded: bool = False, rowwise: QuantizedOperand | None = None,
                  output: str = "payload") -> QuantizedOperand:
    """The operand of `role` (fprop_input, wgrad_input, dgrad_grad, wgrad_grad) from this rank's
    part x2d [tokens, features] of X or G, as QuantizedLinear builds it under ctx's TP/SP layout.

    tokens_sharded: x2d holds this rank's tokens only (a sequence-parallel shard; shards are
    concatenated in rank order, all of one size): μ's sums and the amax are all-reduced over
    ctx.comm's group. `call` is the layer's call index (stochastic-rounding stream). `rowwise`:
    for a wgrad role, the fprop/dgrad operand of the same tensor already built, whose μ̂ and
    amax are reused where the rule allows. `output`: what is kept (operand_output). Weights:
    quantize_tensor(ctx, "weight", ...)."""
    tensor = next((t for t, roles in TENSOR_ROLES.items() if role in roles), None)
    if tensor is None or tensor == "weight":
        raise ValueError(f"quantize_role takes an activation or gradient role "
                         f"{TENSOR_ROLES['input'] + TENSOR_ROLES['grad_output']}, got {role!r}; "
                         "quantize weights with quantize_tensor(ctx, 'weight', ...)")
    p = Placement.of(ctx, tensor, x2d, tokens_sharded)
    reducer = p.reducer(ctx)
    if role == TENSOR_ROLES[tensor][0]:
        return _quantize(ctx, role, x2d, call, reducer, mean_dim=0,
                         offset=(p.token_offset, p.feature_offset), output=output)
    return _quantize(ctx, role, x2d.t(), call, reducer, mean_dim=1,
                     offset=(p.feature_offset, p.token_offset), transposed=True, output=output,
                     **_reused_stats(ctx, tensor, x2d, reducer, rowwise))


def _weight_pair(ctx: LinearContext, weight: torch.Tensor, call: int, columnwise: bool,
                 row_output: str, col_output: str) -> OperandPair:
    """W [N, K] (fprop) and, if asked, Wᵀ [K, N] (dgrad); one 2-D quantization when shared
    (Wᵀ is then the transposed payload, so W keeps it), the fprop operand read in the other
    orientation under quantize-once."""
    r, comm = ctx.recipe, ctx.comm
    n, k = weight.shape
    row_off = ctx.out_positions(n)
    col_off = comm.rank * k if ctx.mode == "row" else 0
    reducer = comm.reducer(False, comm.distributed and ctx.mode != "none")
    transposes = (columnwise and not r.quantize_once and r.shares_weight_quantization
                  and not r.rht("fprop") and not r.rht("dgrad"))
    if transposes and row_output == "values":
        row_output = "both"
    w_f = _quantize(ctx, "fprop_weight", weight, call, reducer, mean_dim=None,
                    offset=(row_off, col_off), output=row_output)
    if not columnwise:
        return OperandPair(w_f, None)
    if r.quantize_once:
        return OperandPair(w_f, w_f.reoriented())
    if transposes:
        return OperandPair(w_f, w_f.t())
    w_d = _quantize(ctx, "dgrad_weight", weight.t(), call, reducer, mean_dim=None,
                    offset=(col_off, row_off), transposed=True, output=col_output,
                    **_reused_stats(ctx, "weight", weight, reducer, w_f))
    return OperandPair(w_f, w_d)


def quantize_tensor(ctx: LinearContext, tensor: str, x2d: torch.Tensor, *, rowwise: bool = True,
                    columnwise: bool = True, row_call: int, col_call: int | None = None,
                    tokens_sharded: bool = False, row_output: str = "payload",
                    col_output: str = "payload") -> OperandPair:
    """The operands of one tensor ("input", "weight" or "grad_output"; this rank's part, 2-D)
    that are asked for. `row_call` / `col_call` are the call indices of the two quantizations
    (the same one when omitted); a weight is quantized once per call (row_call). `row_output`
    / `col_output`: what is kept of each (operand_output; the payload by default)."""
    if tensor not in TENSOR_ROLES:
        raise ValueError(f"unknown tensor {tensor!r}; expected one of {tuple(TENSOR_ROLES)}")
    if not (rowwise or columnwise):
        raise ValueError("ask for the rowwise operand, the columnwise one, or both")
    if tensor == "weight":
        pair = _weight_pair(ctx, x2d, row_call, columnwise, row_output, col_output)
        return OperandPair(pair.rowwise if rowwise else None, pair.columnwise)
    row_role, col_role = TENSOR_ROLES[tensor]
    row = col = None
    if rowwise:
        row = quantize_role(ctx, row_role, x2d, row_call, tokens_sharded=tokens_sharded,
                            output=row_output)
    if columnwise:
        col = quantize_role(ctx, col_role, x2d, row_call if col_call is None else col_call,
                            tokens_sharded=tokens_sharded, rowwise=row, output=col_output)
    return OperandPair(row, col)
