"""The quantized linear under TP + SP, per rank, and its single-device reference (shared by the
CPU/gloo and GPU/NCCL equivalence tests)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_averis.linear import LinearContext, TPComm, quantized_linear
from megatron_averis.recipes import get_recipe

T, K, N = 64, 64, 64
STREAM = 7


def full_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g) + 3 * torch.randn(K, generator=g)
    w = torch.randn(N, K, generator=g) * K**-0.5
    gy = (torch.randn(T, N, generator=g) + 2 * torch.randn(N, generator=g)) * 1e-2
    return x, w, gy


def _record(store):
    def observer(role, op):
        store[role] = op.dequantize(unrotate=False).cpu()
    return observer


def run_linear(recipe_name, mode, comm, shard, device, gather_quantized=True):
    """Forward + backward of one layer; `shard` maps the full tensors to this rank's parts."""
    x, w, gy = (t.to(device) for t in shard(*full_tensors()))
    ops: dict = {}
    ctx = LinearContext(recipe=get_recipe(recipe_name), mode=mode, comm=comm,
                        sequence_parallel=mode != "none", gather_quantized=gather_quantized,
                        stream_id=STREAM, observer=_record(ops))
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = quantized_linear(x, w, None, ctx)
    y.backward(gy)
    return {"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw": w.grad.cpu(), "ops": ops}


def column_shard(rank, world):
    tn, nn = T // world, N // world
    return lambda x, w, gy: (x[rank * tn:(rank + 1) * tn], w[rank * nn:(rank + 1) * nn], gy[:, rank * nn:(rank + 1) * nn])


def row_shard(rank, world):
    tn, kn = T // world, K // world
    return lambda x, w, gy: (x[:, rank * kn:(rank + 1) * kn], w[:, rank * kn:(rank + 1) * kn], gy[rank * tn:(rank + 1) * tn])


def tp_worker(rank, world, cases, device_type):
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    comm = TPComm(dist.group.WORLD)
    out = {}
    for recipe_name, mode, gather_quantized in cases:
        shard = column_shard(rank, world) if mode == "column" else row_shard(rank, world)
        out[(recipe_name, mode, gather_quantized)] = run_linear(
            recipe_name, mode, comm, shard, device, gather_quantized)
    return out


def reference_slices(mode, rank, world):
    """For each result / operand role: the slice of the single-device result this rank holds."""
    tn, kn, nn = T // world, K // world, N // world
    full = slice(None)
    if mode == "column":
        rows_t, cols_n = slice(rank * tn, (rank + 1) * tn), slice(rank * nn, (rank + 1) * nn)
        return {"y": (full, cols_n), "dx": (rows_t, full), "dw": (cols_n, full),
                "fprop_input": (full, full), "fprop_weight": (cols_n, full),
                "dgrad_grad": (full, cols_n), "dgrad_weight": (full, cols_n),
                "wgrad_grad": (cols_n, full), "wgrad_input": (full, full)}
    rows_t, cols_k = slice(rank * tn, (rank + 1) * tn), slice(rank * kn, (rank + 1) * kn)
    return {"y": (rows_t, full), "dx": (full, cols_k), "dw": (full, cols_k),
            "fprop_input": (full, cols_k), "fprop_weight": (full, cols_k),
            "dgrad_grad": (full, full), "dgrad_weight": (cols_k, full),
            "wgrad_grad": (full, full), "wgrad_input": (cols_k, full)}
