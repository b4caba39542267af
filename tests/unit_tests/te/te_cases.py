"""Workers for the adapter's multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_averis.linear.comm import TPComm
from megatron_averis.linear.function import LinearContext
from megatron_averis.linear.operands import quantize_tensor
from megatron_averis.recipes import get_recipe
from megatron_averis.te import core
from megatron_averis.te.stats import holds_shard

SHARD_RECIPE = ("averis", ("inputs.rounding=stochastic", "grads.rounding=stochastic"))


def shard_worker(rank, world, x_full, kind):
    """Each rank quantizes its sequence-parallel shard of x_full; also reports holds_shard for
    the shard and for the whole tensor."""
    group = dist.new_group(list(range(world)))
    t = x_full.shape[0] // world
    shard = x_full[rank * t:(rank + 1) * t]
    flags = (holds_shard(shard, group), holds_shard(x_full, group))
    ctx = LinearContext(recipe=get_recipe(SHARD_RECIPE[0], SHARD_RECIPE[1]),
                        mode="column" if kind == "input" else "row", comm=TPComm(group),
                        sequence_parallel=True, stream_id=7)
    pair = quantize_tensor(ctx, kind, shard, row_call=1, tokens_sharded=True)
    return flags, pair.rowwise.dequantize(), pair.columnwise.dequantize()


def full_operands(x_full, kind):
    ctx = LinearContext(recipe=get_recipe(SHARD_RECIPE[0], SHARD_RECIPE[1]), stream_id=7)
    pair = quantize_tensor(ctx, kind, x_full, row_call=1)
    return pair.rowwise.dequantize(), pair.columnwise.dequantize()


# ---- Transformer Engine (GPU) ----------------------------------------------------------------
# Operand slices of a TP rank inside the TP=1 operand: (dim, split) per GEMM and side, with
# split False for operands every rank holds whole (gathered or replicated).
TP_SLICES = {
    "column": {"fprop": ((0, False), (0, True)), "dgrad": ((1, True), (1, True)),
               "wgrad": ((0, True), (0, False))},
    "row": {"fprop": ((1, True), (1, True)), "dgrad": ((0, False), (0, True)),
            "wgrad": ((0, False), (0, True))},
}


def run_te_linear(module, recipe, x, g):
    """One forward + backward of a TE module under `recipe`; returns outputs and the
    dequantized (FP64, CPU) operands each GEMM received."""
    import transformer_engine.pytorch as te

    seen = {}
    real = core.gemm

    def spy(gemm, xo, wo, *args, **kwargs):
        a, b = core.gemm_operands(gemm, xo, wo)
        seen[gemm] = (a.dequantize().cpu(), b.dequantize().cpu())
        return real(gemm, xo, wo, *args, **kwargs)

    core.gemm = spy
    try:
        x = x.detach().clone().requires_grad_()
        with te.autocast(enabled=True, recipe=recipe):
            y = module(x)
        y.backward(g)
    finally:
        core.gemm = real
    return y.detach().cpu(), x.grad.detach().cpu(), module.weight.grad.detach().cpu(), seen


def te_linear(k, n, **kw):
    import transformer_engine.pytorch as te

    return te.Linear(k, n, bias=False, params_dtype=torch.bfloat16, device="cuda", **kw)


def te_tp_worker(rank, world, name, mode, w_full, x_full, g_full):
    """TE Linear, TP=world + sequence parallelism, this rank's shards of the TP=1 problem."""
    from transformer_engine.common.recipe import CustomRecipe

    from megatron_averis.te.factories import QFactory

    group = dist.new_group(list(range(world)))
    n, k = w_full.shape
    s = x_full.shape[0]
    module = te_linear(k, n, parallel_mode=mode, sequence_parallel=True, tp_group=group,
                       tp_size=world)
    if mode == "column":
        w = w_full.chunk(world, 0)[rank]
        x, g = x_full.chunk(world, 0)[rank], g_full.chunk(world, -1)[rank]
    else:
        w = w_full.chunk(world, 1)[rank]
        x, g = x_full.chunk(world, -1)[rank], g_full[rank * s // world:(rank + 1) * s // world]
    with torch.no_grad():
        module.weight.copy_(w.cuda())
    recipe = CustomRecipe(qfactory=QFactory(name, first_stream=0))
    return run_te_linear(module, recipe, x.contiguous().cuda(), g.contiguous().cuda())
