"""Every tensor/sequence-parallel collective of the quantized linear, in one place.

`TPComm` wraps one process group. `group=None` (or a group of one rank) is a single device: every
operation is the identity, so the autograd function has one code path for all layouts.

What travels (per call, all sizes per rank):
- `reducer(...)`: all-reduce of [column sums ‖ token count] (FP32, sum) and of the
  residual amax (FP32 scalar, max) — the statistics an operand needs to be quantized as it
  would be on one device. Column sums are reduced only when tokens are split over ranks.
- `gather_operand(op, dim)`: all-gather of a quantized operand's payload (packed FP4 codes,
  block scales) along tokens; the tensor scale and mean are already identical on every rank.
- `gather(t)`, `reduce_scatter(t)`, `all_reduce(t)`: BF16/FP32 tensors along the first dim.

Gloo (CPU tests) lacks reduce-scatter and gathers of FP8: those become an all-reduce followed by
taking this rank's slice, and FP8 payloads travel as bytes. The arithmetic is the same either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_averis.numerics.blockscale import QuantizedTensor
from megatron_averis.numerics.operand import LOCAL, QuantizedOperand, StatsReducer


class _GroupReducer:
    def __init__(self, comm: "TPComm", sums: bool, amax: bool):
        self.comm, self.sums, self.amax = comm, sums, amax

    def sum(self, t):
        return self.comm.all_reduce(t) if self.sums else t

    def max(self, t):
        return self.comm.all_reduce(t, op=dist.ReduceOp.MAX) if self.amax else t


class TPComm:
    def __init__(self, group=None):
        self.group = group
        self.world = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self._nccl = self.world > 1 and dist.get_backend(group) == "nccl"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def reducer(self, tokens_sharded: bool, features_sharded: bool) -> StatsReducer:
        """Statistics reducer for an operand of which this rank holds a part: the amax is reduced
        whenever the operand is split (so its tensor scale is the global one), the column sums
        for the mean only when the tokens are split."""
        split = self.distributed and (tokens_sharded or features_sharded)
        if not split:  # nothing to combine: the local statistics (no collective, no packing)
            return LOCAL
        return _GroupReducer(self, sums=tokens_sharded, amax=True)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.distributed:
            t = t.contiguous()
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """All-gather along `dim` (concatenated in rank order)."""
        if not self.distributed:
            return t
        t = t.contiguous()
        as_bytes = t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        src = t.view(torch.uint8) if as_bytes else t
        if self._nccl:
            out = torch.empty((self.world * src.shape[0],) + tuple(src.shape[1:]),
                              dtype=src.dtype, device=src.device)
            dist.all_gather_into_tensor(out, src, group=self.group)
            if dim != 0:
                out = torch.cat(out.chunk(self.world, dim=0), dim=dim)
        else:
            parts = [torch.empty_like(src) for _ in range(self.world)]
            dist.all_gather(parts, src, group=self.group)
            out = torch.cat(parts, dim=dim)
        return out.view(t.dtype) if as_bytes else out

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, keep this rank's slice of the first dimension."""
        if not self.distributed:
            return t
        t = t.contiguous()
        if t.shape[0] % self.world:
            raise ValueError(f"cannot reduce-scatter {t.shape[0]} rows over {self.world} ranks")
        if self._nccl:
            out = torch.empty((t.shape[0] // self.world,) + tuple(t.shape[1:]),
                              dtype=t.dtype, device=t.device)
            dist.reduce_scatter_tensor(out, t, group=self.group)
            return out
        return self.all_reduce(t.clone()).chunk(self.world, dim=0)[self.rank].contiguous()

    def gather_operand(self, op: QuantizedOperand, dim: int) -> QuantizedOperand:
        """All-gather an operand's shards along `dim` (0: rows = tokens, 1: K = tokens)."""
        if not self.distributed:
            return op
        shape = list(op.shape)
        shape[dim] *= self.world
        if op.qt is None:
            return QuantizedOperand(tuple(shape), bf16=self.gather(op.bf16, dim),
                                    transposed=op.transposed)
        qt = op.qt
        data, block_scales, tensor_scale = qt.packed()
        gathered = QuantizedTensor(
            data=self.gather(data, dim),
            block_scales=self.gather(block_scales, dim),
            tensor_scale=tensor_scale,
            fmt=qt.fmt,
            block=qt.block,
            shape=tuple(shape),
        )
        return QuantizedOperand(tuple(shape), qt=gathered, mean=op.mean, mean_dim=op.mean_dim,
                                signs=op.signs, transposed=op.transposed)


SINGLE_DEVICE = TPComm(None)
