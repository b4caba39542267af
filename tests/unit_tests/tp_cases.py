"""The quantized linear under TP + SP, per rank, and its single-device reference (shared by the
CPU/gloo and GPU/NCCL equivalence tests)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from megatron_averis.linear import LinearContext, TPComm, quantized_linear
from megatron_averis.linear.saved import SavedBytes
from megatron_averis.recipes import get_recipe

T, K, N = 64, 64, 64
STREAM = 7


def full_tensors(seed=0, t=T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, K, generator=g) + 3 * torch.randn(K, generator=g)
    w = torch.randn(N, K, generator=g) * K**-0.5
    gy = (torch.randn(t, N, generator=g) + 2 * torch.randn(N, generator=g)) * 1e-2
    return x, w, gy


def _record(store):
    def observer(role, op):
        store[role] = op.dequantize(unrotate=False).cpu()
    return observer


def run_linear(recipe_name, mode, comm, shard, device, gather_quantized=True, t=T,
               dtype=torch.float32, after_forward=None):
    """Forward + backward of one layer; `shard` maps the full tensors to this rank's parts.
    Also returns the bytes saved for backward (linear.saved.SavedBytes) and what
    `after_forward()` returns when called between forward and backward."""
    x, w, gy = (v.to(device, dtype) for v in shard(*full_tensors(t=t)))
    ops: dict = {}
    ctx = LinearContext(recipe=get_recipe(recipe_name), mode=mode, comm=comm,
                        sequence_parallel=mode != "none", gather_quantized=gather_quantized,
                        stream_id=STREAM, observer=_record(ops))
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    with SavedBytes(exclude=[w]) as saved:
        y = quantized_linear(x, w, None, ctx)
    between = after_forward() if after_forward is not None else None
    y.backward(gy)
    return {"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw": w.grad.cpu(), "ops": ops,
            "saved_bytes": saved.total, "after_forward": between}


def column_shard(rank, world, t=T):
    tn, nn = t // world, N // world
    return lambda x, w, gy: (x[rank * tn:(rank + 1) * tn], w[rank * nn:(rank + 1) * nn], gy[:, rank * nn:(rank + 1) * nn])


def row_shard(rank, world, t=T):
    tn, kn = t // world, K // world
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


def reference_slices(mode, rank, world, t=T):
    """For each result / operand role: the slice of the single-device result this rank holds."""
    tn, kn, nn = t // world, K // world, N // world
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


class GatherCountingComm(TPComm):
    """TPComm that counts the bytes this rank contributes to all-gathers."""

    def __init__(self, group):
        super().__init__(group)
        self.gathered = 0

    def gather(self, t, dim=0):
        self.gathered += t.numel() * t.element_size()
        return super().gather(t, dim)


def saved_bytes_worker(rank, world, cases):
    """Per (recipe, mode, tokens): this rank's results (run_linear), the bytes it
    all-gathered in forward and in backward, and the warnings it raised."""
    out = {}
    for recipe_name, mode, t in cases:
        comm = GatherCountingComm(dist.group.WORLD)
        shard = (column_shard if mode == "column" else row_shard)(rank, world, t)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = run_linear(recipe_name, mode, comm, shard, torch.device("cpu"), t=t,
                             after_forward=lambda: comm.gathered)
        res["gathered_forward"] = res.pop("after_forward")
        res["gathered_backward"] = comm.gathered - res["gathered_forward"]
        res["warnings"] = [str(w.message) for w in caught]
        out[(recipe_name, mode, t)] = res
    return out
