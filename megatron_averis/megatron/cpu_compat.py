"""The CUDA assumptions of megatron-core 0.16.1 that a CPU-only GPT model runs into.

With use_cpu_initialization=True, TransformerConfig builds every GPT module on the CPU and the
forward/backward pass stays there, except for RoPE:
- RotaryEmbedding.get_emb moves its `inv_freq` buffer to torch.cuda.current_device() on first
  use, which raises without CUDA;
- under context parallelism, RotaryEmbedding.forward slices the position embedding to this CP
  rank's zigzag chunks with rope_utils.get_pos_emb_on_this_cp_rank, which builds its index in
  pinned memory and moves it with .cuda().

install() (called by build_gpt_model, idempotent) patches only when CUDA is unavailable: it wraps
RotaryEmbedding.get_emb so that, during that call, torch.cuda.current_device() answers "cpu" and
the move is a no-op; and it replaces the name get_pos_emb_on_this_cp_rank that
rotary_pos_embedding imported by the same slicing done on the embedding's own device. Both
wrappers decide per call: nothing changes once CUDA is available.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.models.common.embeddings import rotary_pos_embedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

_PATCHED = "_averis_cpu_compat"


def install() -> None:
    if torch.cuda.is_available():
        return
    if not getattr(RotaryEmbedding.get_emb, _PATCHED, False):
        RotaryEmbedding.get_emb = _get_emb_on_cpu(RotaryEmbedding.get_emb)
    if not getattr(rotary_pos_embedding.get_pos_emb_on_this_cp_rank, _PATCHED, False):
        rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank_anywhere(
            rotary_pos_embedding.get_pos_emb_on_this_cp_rank)


def _get_emb_on_cpu(original):
    @functools.wraps(original)
    def get_emb_on_cpu(self, *args, **kwargs):
        if torch.cuda.is_available():  # decided per call: a later CUDA model behaves as unpatched
            return original(self, *args, **kwargs)
        current_device = torch.cuda.current_device
        torch.cuda.current_device = lambda: "cpu"
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current_device

    setattr(get_emb_on_cpu, _PATCHED, True)
    return get_emb_on_cpu


def _pos_emb_on_this_cp_rank_anywhere(original):
    @functools.wraps(original)
    def pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        if torch.cuda.is_available():
            return original(pos_emb, seq_dim, cp_group)
        # As mcore: of 2·cp equal chunks along seq_dim, CP rank r keeps chunks r and 2·cp-1-r.
        cp, rank = cp_group.size(), cp_group.rank()
        if pos_emb.shape[seq_dim] % (2 * cp):
            raise ValueError(f"sequence length {pos_emb.shape[seq_dim]} is not divisible by "
                             f"2·context_parallel_size = {2 * cp}; pad or cut the sequences")
        chunks = pos_emb.chunk(2 * cp, dim=seq_dim)
        return torch.cat((chunks[rank], chunks[2 * cp - 1 - rank]), dim=seq_dim)

    setattr(pos_emb_on_this_cp_rank, _PATCHED, True)
    return pos_emb_on_this_cp_rank
