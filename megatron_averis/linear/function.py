"""The quantized linear: one autograd function for single-device, column- and row-parallel use.

Forward  Y  = X·Wᵀ (+ b)      fprop operands X [T, K] and W [N, K], both along K
Backward dX = G·W             dgrad operands G [T, N] and Wᵀ [K, N], both along N
         dW = Gᵀ·X            wgrad operands Gᵀ [N, T] and Xᵀ [K, T], both along tokens

Each operand is built by numerics.quantize_operand from its OperandRecipe and every GEMM is the
emulated FP4 GEMM (numerics.qgemm). Tensor/sequence parallelism changes only which part of a
tensor a rank holds; all collectives go through linear.comm.TPComm:

  mode "column" (W split over N): with sequence parallelism X arrives split over tokens: its
      operands are quantized with group-wide mean and amax, and the FP4 payload is all-gathered;
      dX is reduce-scattered over tokens (all-reduced without SP).
  mode "row" (W split over K): X holds all tokens; the output is reduce-scattered over tokens
      (all-reduced without SP) inside the function, so that backward receives G split over
      tokens and can quantize it with group-wide statistics and all-gather the FP4 payload.

Every rank thereby quantizes with the statistics and random bits the operand would have on one
device (see numerics.random), so TP=2+SP reproduces TP=1's operands.

The X operand for wgrad is quantized in forward and saved packed (FP4 codes, not BF16 X).
Under a quantize-once recipe (averis-paper) X, W and G are quantized once, along features, and
dgrad/wgrad read them in the other orientation (QuantizedOperand.reoriented, emulation only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_averis.linear.comm import SINGLE_DEVICE, TPComm
from megatron_averis.linear.sr_step import SR_STEP
from megatron_averis.numerics.hadamard import random_signs
from megatron_averis.numerics.operand import QuantizedOperand, quantize_operand
from megatron_averis.numerics.qgemm import qgemm
from megatron_averis.numerics.random import StepSeed, mix_seed
from megatron_averis.recipes import OPERAND_ROLES, Recipe, check_token_count

MODES = ("none", "column", "row")


@dataclass
class LinearContext:
    """Everything the function needs besides tensors. One per module; `step()` per forward call.

    stream_id: identifies the layer in the stochastic-rounding stream (the same on all TP ranks).
        A seed mixes (recipe seed, stream_id, call_index, operand role, replica_id) and, once a
        training loop drives linear.sr_step.SR_STEP, the iteration from device memory; the call
        index then counts calls within the step.
    replica_id: the data(+context)-parallel rank: replicas see different tokens at the same local
        positions, so they must not share rounding bits (their noise would be correlated).
    gather_quantized: under SP, all-gather FP4 payloads (True) or BF16 tensors then quantize
        (False, the unquantized-communication baseline).
    accumulate_main_grad: add dW into weight.main_grad (FP32) as Megatron's
        gradient-accumulation fusion does, instead of returning it.
    out_stride: megatron-core's partition stride of a column-parallel weight: with stride s a
        rank holds s separate chunks of the output features (SwiGLU's fc1: s=2, [gate, up]).
        Needed to give each element its global position in the stochastic-rounding stream.
    observer: called as observer(role, operand) with each operand as it enters its GEMM (after
        any gather): for diagnostics and the TP-equivalence tests.
    """

    recipe: Recipe
    mode: str = "none"
    comm: TPComm = SINGLE_DEVICE
    sequence_parallel: bool = False
    gather_quantized: bool = True
    accumulate_main_grad: bool = False
    out_stride: int = 1
    stream_id: int = 0
    replica_id: int = 0
    call_index: int = 0
    step_epoch: int = 0
    signs: dict = field(default_factory=dict)
    observer: Callable[[str, QuantizedOperand], None] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.sequence_parallel and self.mode == "none":
            raise ValueError("sequence parallelism needs mode 'column' or 'row'")
        for gemm in ("fprop", "dgrad", "wgrad"):
            if self.recipe.rht(gemm):
                self.signs[gemm] = random_signs(self.recipe.rht_seed)

    def observe(self, **operands: QuantizedOperand) -> None:
        if self.observer is not None:
            for role, op in operands.items():
                self.observer(role, op)

    def out_positions(self, n_local: int):
        """Global output-feature index of this rank's first (or every) local output feature."""
        if self.mode != "column" or not self.comm.distributed:
            return 0
        if self.out_stride == 1:
            return self.comm.rank * n_local
        chunk = n_local // self.out_stride
        n_full = n_local * self.comm.world
        local = torch.arange(n_local)
        return (local // chunk) * (n_full // self.out_stride) + self.comm.rank * chunk + local % chunk

    def step(self) -> int:
        if self.step_epoch != SR_STEP.epoch:  # a new training step began
            self.step_epoch, self.call_index = SR_STEP.epoch, 0
        self.call_index += 1
        return self.call_index

    def seed(self, role: str, call_index: int, device: torch.device) -> int | StepSeed:
        base = mix_seed(self.recipe.sr_seed, self.stream_id, call_index,
                        OPERAND_ROLES.index(role), self.replica_id)
        step = SR_STEP.tensor(device)
        return base if step is None else StepSeed(base, step)


def _quantize(ctx: LinearContext, role: str, x: torch.Tensor, call: int, *, mean_dim: int | None,
              tokens_sharded: bool, features_sharded: bool, offset: tuple[int, int],
              signs: torch.Tensor | None, transposed: bool = False, **shared) -> QuantizedOperand:
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
        signs=signs,  # kept on the CPU: the kernels take them as a compile-time bit mask
        sr_seed=ctx.seed(role, call, x.device) if o.rounding == "stochastic" else None,
        rng_offset=offset,
        reducer=ctx.comm.reducer(tokens_sharded, features_sharded),
        transposed=transposed,
        **shared,
    )


def _shared_stats(ctx: LinearContext, first_role: str, second_role: str,
                  op: QuantizedOperand) -> dict:
    """What the second operand of a tensor may reuse from the first (`op`): its stored μ, and its
    residual amax when both quantize the same residual (same μ or none, no rotation, NVFP4)."""
    a, b = ctx.recipe.operand(first_role), ctx.recipe.operand(second_role)
    first_gemm, second_gemm = first_role.split("_")[0], second_role.split("_")[0]
    shared = {}
    if (op.mean is not None and b.mean_split and a.mean_format == b.mean_format
            and not ctx.recipe.rht(first_gemm)):
        shared["mean"] = op.mean
    same_residual = ("mean" in shared) or (not a.mean_split and not b.mean_split)
    if (same_residual and op.amax is not None and b.format == "nvfp4"
            and not ctx.recipe.rht(first_gemm) and not ctx.recipe.rht(second_gemm)):
        shared["amax"] = op.amax
    return shared


def _weight_operands(ctx: LinearContext, weight: torch.Tensor, call: int):
    """(fprop operand W [N, K], dgrad operand Wᵀ [K, N]); one 2-D quantization when shared."""
    r, comm = ctx.recipe, ctx.comm
    split = comm.distributed and ctx.mode != "none"
    n, k = weight.shape
    row_off = ctx.out_positions(n)
    col_off = comm.rank * k if ctx.mode == "row" else 0
    common = dict(mean_dim=None, tokens_sharded=False, features_sharded=split)
    w_f = _quantize(ctx, "fprop_weight", weight, call, offset=(row_off, col_off),
                    signs=ctx.signs.get("fprop"), **common)
    if r.quantize_once:
        return w_f, w_f.reoriented()
    if r.shares_weight_quantization and "fprop" not in ctx.signs and "dgrad" not in ctx.signs:
        return w_f, w_f.t()
    w_d = _quantize(ctx, "dgrad_weight", weight.t(), call, offset=(col_off, row_off),
                    signs=ctx.signs.get("dgrad"), transposed=True, **common,
                    **_shared_stats(ctx, "fprop_weight", "dgrad_weight", w_f))
    return w_f, w_d


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(autograd_ctx, x, weight, bias, ctx: LinearContext):
        call = ctx.step()
        comm, sp = ctx.comm, ctx.sequence_parallel and ctx.comm.distributed
        x2d = x.reshape(-1, x.shape[-1])
        t_local = x2d.shape[0]
        column_sp = ctx.mode == "column" and sp
        if column_sp and not ctx.gather_quantized:
            x2d = comm.gather(x2d, 0)
        tokens_split = column_sp and ctx.gather_quantized
        # Blocks along tokens must not straddle ranks: check the count each rank quantizes.
        t_quant = x2d.shape[0] // comm.world if ctx.mode == "row" and sp else x2d.shape[0]
        check_token_count(ctx.recipe, t_quant, "quantized linear (wgrad blocks along tokens)")
        tok_off = comm.rank * t_local if tokens_split else 0
        feat_off = comm.rank * x2d.shape[1] if ctx.mode == "row" else 0
        feat_split = ctx.mode == "row" and comm.distributed

        xq = _quantize(ctx, "fprop_input", x2d, call, mean_dim=0, tokens_sharded=tokens_split,
                       features_sharded=feat_split, offset=(tok_off, feat_off),
                       signs=ctx.signs.get("fprop"))
        if ctx.recipe.quantize_once:
            xq_w = xq  # reoriented for wgrad in backward, after any gather
        else:
            xq_w = _quantize(ctx, "wgrad_input", x2d.t(), call, mean_dim=1,
                             tokens_sharded=tokens_split, features_sharded=feat_split,
                             offset=(feat_off, tok_off), signs=ctx.signs.get("wgrad"),
                             transposed=True, **_shared_stats(ctx, "fprop_input", "wgrad_input", xq))
        if tokens_split:
            xq = comm.gather_operand(xq, 0)
        w_f, w_d = _weight_operands(ctx, weight, call)
        ctx.observe(fprop_input=xq, fprop_weight=w_f)

        y = qgemm(xq, w_f, bias=bias, out_dtype=x.dtype)
        if ctx.mode == "row" and comm.distributed:
            y = comm.reduce_scatter(y) if sp else comm.all_reduce(y)

        autograd_ctx.ctx = ctx
        autograd_ctx.call = call
        autograd_ctx.ops = (xq_w, w_d)
        autograd_ctx.weight = weight
        autograd_ctx.has_bias = bias is not None
        autograd_ctx.x_shape = x.shape
        if ctx.mode == "column" and sp:
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
        xq_w, w_d = autograd_ctx.ops
        weight = autograd_ctx.weight
        g = grad_out.reshape(-1, grad_out.shape[-1])
        row_sp = ctx.mode == "row" and sp
        if row_sp and not ctx.gather_quantized:
            g = comm.gather(g, 0)
        tokens_split = row_sp and ctx.gather_quantized
        tok_off = comm.rank * g.shape[0] if tokens_split else 0
        feat_off = ctx.out_positions(g.shape[1])
        feat_split = ctx.mode == "column" and comm.distributed

        gq = _quantize(ctx, "dgrad_grad", g, call, mean_dim=0, tokens_sharded=tokens_split,
                       features_sharded=feat_split, offset=(tok_off, feat_off),
                       signs=ctx.signs.get("dgrad"))
        once = ctx.recipe.quantize_once
        if not once:
            gq_w = _quantize(ctx, "wgrad_grad", g.t(), call, mean_dim=1,
                             tokens_sharded=tokens_split, features_sharded=feat_split,
                             offset=(feat_off, tok_off), signs=ctx.signs.get("wgrad"),
                             transposed=True, **_shared_stats(ctx, "dgrad_grad", "wgrad_grad", gq))
        # Token-sharded operands are gathered along tokens: dim 0 of X and G, dim 1 of Xᵀ and Gᵀ.
        if tokens_split:
            gq = comm.gather_operand(gq, 0)
            if not once:
                gq_w = comm.gather_operand(gq_w, 1)
        if ctx.mode == "column" and sp and ctx.gather_quantized:
            xq_w = comm.gather_operand(xq_w, 0 if once else 1)
        if once:
            gq_w, xq_w = gq.reoriented(), xq_w.reoriented()
        ctx.observe(dgrad_grad=gq, dgrad_weight=w_d, wgrad_grad=gq_w, wgrad_input=xq_w)

        dx = qgemm(gq, w_d, out_dtype=grad_out.dtype)
        if ctx.mode == "column" and comm.distributed:
            dx = comm.reduce_scatter(dx) if sp else comm.all_reduce(dx)
        dx = dx.view(autograd_ctx.x_shape)

        dw = qgemm(gq_w, xq_w, cross_terms=once)
        grad_bias = g.float().sum(0).to(grad_out.dtype) if autograd_ctx.has_bias else None
        if ctx.accumulate_main_grad:
            weight.main_grad.add_(dw)
            grad_weight = None
            if hasattr(weight, "grad_added_to_main_grad"):
                # Megatron DDP expects a (dummy) grad so its hooks run on the main thread.
                grad_weight = torch.zeros(weight.main_grad.shape, dtype=weight.dtype,
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
