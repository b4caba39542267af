"""Sequence-parallel shards quantized by the adapter get the statistics, stochastic-rounding
positions and hence the operands of the whole tensor (gloo, 2 processes)."""

import pytest
import torch

from te_cases import full_operands, shard_worker
from tp_harness import run_world


@pytest.mark.parametrize("kind", ["input", "grad_output"])
def test_shards_quantize_like_the_whole_tensor(kind):
    torch.manual_seed(0)
    world, t, k = 2, 64, 64
    x = (torch.randn(t, k) * torch.linspace(0.1, 3, k) + 2.0).bfloat16()
    row_full, col_full = full_operands(x, kind)
    results = run_world(world, shard_worker, x, kind)
    for rank, ((is_shard, whole_is_shard), row, col) in enumerate(results):
        assert is_shard and not whole_is_shard
        rows = slice(rank * t // world, (rank + 1) * t // world)
        assert torch.equal(row, row_full[rows])
        assert torch.equal(col, col_full[:, rows])
