"""Is the tensor TE hands a quantizer this rank's sequence-parallel shard, or the whole tensor?

TE marks the quantizations that may see a sequence-parallel shard (column-parallel input,
row-parallel output gradient) by giving the quantizer an amax-reduction group. TE's own NVFP4
quantizer is then called on the local shard and gathers FP4 data; TE 2.20 instead all-gathers a
custom quantizer's tensor in high precision and quantizes the gathered tensor, which already
holds every token. The same flag therefore arrives with either, and this module tells them apart
from the data: the per-column sums of a whole tensor are identical on every rank, those of
different shards are not. One all-gather of [column sums ‖ row count] per flagged call decides.

A shard gets group-wide token statistics (TPComm's reducer) and its global token offset (shards
are concatenated in rank order, all of one size: TE's all-gather requires it); the whole tensor
keeps its local statistics, which are the global ones, and offset 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def holds_shard(x2d: torch.Tensor, group) -> bool:
    """True when the ranks of `group` hold different slices of one tensor (not copies of it)."""
    world = dist.get_world_size(group)
    if world == 1:
        return False
    local = torch.cat([x2d.sum(dim=0, dtype=torch.float32),
                       torch.full((1,), float(x2d.shape[0]), device=x2d.device)])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    # NaN != NaN: a non-finite tensor counts as a shard, whose statistics then carry the NaN
    # to every rank, as they would for the whole tensor.
    return not all(torch.equal(g, gathered[0]) for g in gathered[1:])
