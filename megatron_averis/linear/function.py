"""The quantized linear: one autograd function for single-device, column- and row-parallel use.

Forward  Y  = X·Wᵀ (+ b)      fprop operands X [T, K] and W [N, K], both along K
Backward dX = G·W             dgrad operands G [T, N] and Wᵀ [K, N], both along N
         dW = Gᵀ·X            wgrad operands Gᵀ [N, T] and Xᵀ [K, T], both along tokens

Each operand is built by the per-role quantizer (linear.operands, which the Transformer Engine
adapter shares) from its OperandRecipe and every GEMM is the emulated FP4 GEMM (numerics.qgemm). Tensor/sequence parallelism changes only which part of a
tensor a rank holds; all collectives go through linear.comm.TPComm:

  mode "column" (W split over N): with sequence parallelism X arrives split over tokens: its
      operands are quantized with group-wide mean and amax, and the FP4 payload is all-gathered;
      dX is reduce-scattered over tokens (all-reduced without SP).
  mode "row" (W split over K): X holds all tokens; the output is reduce-scattered over tokens
      (all-reduced without SP) inside the function, so that backward receives G split over
      tokens and can quantize it with group-wide statistics and all-gather the FP4 payload.

Every rank thereby quantizes with the statistics and random bits the operand would have on one
device (see numerics.random), so TP=2+SP reproduces TP=1's operands.

Saved for backward (linear.saved): X's wgrad operand, quantized in forward in the orientation
wgrad reads it (Xᵀ along tokens, rotated where the recipe rotates wgrad), and W's dgrad operand,
both as packed payloads (FP4 codes, block scales, tensor scale, μ̂) through save_for_backward;
the BF16 X is not kept. Under sequence parallelism a column-parallel layer saves its token shard
and all-gathers that payload in backward (BF16 X is gathered in forward instead when a rank's
tokens do not fill whole wgrad blocks: _gathers_fp4). Under a quantize-once recipe
(averis-paper) X, W and G are quantized once, along features; X̂ and Ŵ are saved packed and
dgrad/wgrad read them in the other orientation (QuantizedOperand.reoriented, emulation only).

Operands that a GEMM reads at once (fprop X and W, backward's G) are quantized with their BF16
GEMM values written in the quantize pass and, unless they are also saved or gathered, without a
packed payload (linear.operands.operand_output).
"""

from __future__ import annotations

import warnings

import torch

from megatron_averis.linear.context import MODES, LinearContext
from megatron_averis.linear.operands import operand_output, quantize_tensor
from megatron_averis.linear.saved import pack_operands, unpack_operands
from megatron_averis.numerics.qgemm import qgemm
from megatron_averis.recipes import check_token_count, wgrad_token_multiple

__all__ = ["MODES", "LinearContext", "quantized_linear"]


def _gathers_fp4(ctx: LinearContext, tokens: int) -> bool:
    """Check the token count; under sequence parallelism say whether the FP4 payloads are
    gathered along tokens (True) or BF16 tensors are gathered and then quantized (False).

    The sequence-split tensor is X of a column-parallel layer (`tokens` rows here) and G of a
    row-parallel one (`tokens` / world rows in backward). Its wgrad operand has blocks along
    tokens, so a payload gather needs each rank's tokens to fill whole blocks; otherwise the
    layer falls back to gathering BF16, which quantizes the whole tensor as one device would."""
    comm = ctx.comm
    where = "quantized linear (wgrad blocks along tokens)"
    if not (ctx.sequence_parallel and comm.distributed):
        check_token_count(ctx.recipe, tokens, where)
        return False
    per_rank = tokens if ctx.mode == "column" else tokens // comm.world
    check_token_count(ctx.recipe, per_rank * comm.world, where)
    m = wgrad_token_multiple(ctx.recipe)
    if ctx.gather_quantized and per_rank % m:
        warnings.warn(
            f"quantized linear: {per_rank} tokens per sequence-parallel rank is not a multiple of "
            f"the {m}-token wgrad block of recipe {ctx.recipe.name!r}, so FP4 blocks would straddle "
            f"ranks: all-gathering BF16 {'X' if ctx.mode == 'column' else 'G'} instead of its FP4 "
            f"payload (same numerics, more traffic); make micro-batch x sequence "
            f"length / TP a multiple of {m}", RuntimeWarning, stacklevel=4)
        return False
    return ctx.gather_quantized


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(autograd_ctx, x, weight, bias, ctx: LinearContext):
        call = ctx.step()
        comm, sp = ctx.comm, ctx.sequence_parallel and ctx.comm.distributed
        once = ctx.recipe.quantize_once
        x2d = x.reshape(-1, x.shape[-1])
        gather_fp4 = _gathers_fp4(ctx, x2d.shape[0])
        column_sp = ctx.mode == "column" and sp
        if column_sp and not gather_fp4:
            x2d = comm.gather(x2d, 0)
        tokens_split = column_sp and gather_fp4
        # Backward's X operand is built now, in the orientation wgrad reads (Xᵀ along tokens;
        # X̂ itself under quantize-once, reoriented in backward after any gather).
        xp = quantize_tensor(ctx, "input", x2d, columnwise=not once, row_call=call,
                             tokens_sharded=tokens_split, row_output=operand_output(
                                 ctx, gemm_now=not tokens_split, kept=once or tokens_split))
        xq, x_saved = xp.rowwise, (xp.rowwise if once else xp.columnwise)
        if tokens_split:
            xq = comm.gather_operand(xq, 0)
        wp = quantize_tensor(ctx, "weight", weight, columnwise=not once, row_call=call,
                             row_output=operand_output(ctx, gemm_now=True, kept=once))
        w_f = wp.rowwise
        ctx.observe(fprop_input=xq, fprop_weight=w_f)

        y = qgemm(xq, w_f, bias=bias, out_dtype=x.dtype, fp4_gemm=ctx.recipe.fp4_gemm)
        if ctx.mode == "row" and comm.distributed:
            y = comm.reduce_scatter(y) if sp else comm.all_reduce(y)

        tensors, autograd_ctx.layouts = pack_operands([x_saved, w_f if once else wp.columnwise])
        autograd_ctx.save_for_backward(*tensors)
        autograd_ctx.ctx = ctx
        autograd_ctx.call = call
        autograd_ctx.gather_fp4 = gather_fp4
        autograd_ctx.weight = weight
        autograd_ctx.has_bias = bias is not None
        autograd_ctx.x_shape = x.shape
        if column_sp:
            lead = (x.shape[0] * comm.world,) + tuple(x.shape[1:-1])
        elif ctx.mode == "row" and sp:
            lead = (x.shape[0] // comm.world,) + tuple(x.shape[1:-1])
        else:
            lead = tuple(x.shape[:-1])
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(autograd_ctx, grad_out):
        ctx: LinearContext = autograd_ctx.ctx
        call = autograd_ctx.call
        comm, sp = ctx.comm, ctx.sequence_parallel and ctx.comm.distributed
        once = ctx.recipe.quantize_once
        xq_w, w_d = unpack_operands(autograd_ctx.saved_tensors, autograd_ctx.layouts)
        weight = autograd_ctx.weight
        g = grad_out.reshape(-1, grad_out.shape[-1])
        row_sp = ctx.mode == "row" and sp
        if row_sp and not autograd_ctx.gather_fp4:
            g = comm.gather(g, 0)
        tokens_split = row_sp and autograd_ctx.gather_fp4

        # G's operands feed dgrad and wgrad now; a token shard is gathered first (payload).
        g_out = operand_output(ctx, gemm_now=not tokens_split, kept=tokens_split)
        gp = quantize_tensor(ctx, "grad_output", g, columnwise=not once, row_call=call,
                             tokens_sharded=tokens_split, row_output=g_out, col_output=g_out)
        gq, gq_w = gp.rowwise, gp.columnwise
        # Token-sharded operands are gathered along tokens: dim 0 of X and G, dim 1 of Xᵀ and Gᵀ.
        if tokens_split:
            gq = comm.gather_operand(gq, 0)
            if not once:
                gq_w = comm.gather_operand(gq_w, 1)
        if ctx.mode == "column" and sp and autograd_ctx.gather_fp4:
            xq_w = comm.gather_operand(xq_w, 0 if once else 1)
        if once:
            gq_w, xq_w, w_d = gq.reoriented(), xq_w.reoriented(), w_d.reoriented()
        ctx.observe(dgrad_grad=gq, dgrad_weight=w_d, wgrad_grad=gq_w, wgrad_input=xq_w)

        dx = qgemm(gq, w_d, out_dtype=grad_out.dtype, fp4_gemm=ctx.recipe.fp4_gemm)
        if ctx.mode == "column" and comm.distributed:
            dx = comm.reduce_scatter(dx) if sp else comm.all_reduce(dx)
        dx = dx.view(autograd_ctx.x_shape)

        # dW in FP32 into main_grad where DDP gives one, never rounded to the weight's dtype;
        # an FP32 buffer takes it in the GEMM's epilogue (no FP32 dW is written out first).
        main_grad = getattr(weight, "main_grad", None) if ctx.accumulate_main_grad else None
        in_epilogue = (main_grad is not None and main_grad.dtype == torch.float32
                       and main_grad.is_contiguous())
        dw = qgemm(gq_w, xq_w, cross_terms=once, fp4_gemm=ctx.recipe.fp4_gemm,
                   accumulate=main_grad if in_epilogue else None)
        grad_bias = g.float().sum(0).to(grad_out.dtype) if autograd_ctx.has_bias else None
        if main_grad is not None:
            if not in_epilogue:
                main_grad.add_(dw)
            grad_weight = None
            if hasattr(weight, "grad_added_to_main_grad"):
                # Megatron DDP expects a (dummy) grad so its hooks run on the main thread; it
                # skips adding one flagged as added, so its contents are read only when the
                # weight asks for zeros (megatron-core's zero_out_wgrad).
                alloc = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
                grad_weight = alloc(weight.main_grad.shape, dtype=weight.dtype,
                                    device=weight.device)
                weight.grad_added_to_main_grad = True
        else:
            grad_weight = dw.to(weight.dtype)
        return dx, grad_weight, grad_bias, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     ctx: LinearContext) -> torch.Tensor:
    """y = x·Wᵀ + b under ctx.recipe. x is [..., K]; a BF16 recipe is exactly F.linear."""
    if ctx.recipe.is_bf16 and ctx.mode == "none":
        return torch.nn.functional.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input features {x.shape[-1]} do not match weight {tuple(weight.shape)}")
    return _QuantizedLinear.apply(x, weight, bias, ctx)
