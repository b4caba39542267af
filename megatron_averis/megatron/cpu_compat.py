"""The one CUDA assumption of megatron-core 0.16.1 that a CPU-only GPT model runs into.

With use_cpu_initialization=True, TransformerConfig builds every GPT module on the CPU and the
forward/backward pass stays there, except for RoPE: RotaryEmbedding.get_emb moves its `inv_freq`
buffer to torch.cuda.current_device() on first use, which raises without CUDA.

install() (called by build_gpt_model, idempotent) patches only when CUDA is unavailable: it wraps
RotaryEmbedding.get_emb so that, during that call, torch.cuda.current_device() answers "cpu" and
the move is a no-op. Nothing changes on a machine with CUDA.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

_PATCHED = "_averis_cpu_compat"


def install() -> None:
    if torch.cuda.is_available() or getattr(RotaryEmbedding.get_emb, _PATCHED, False):
        return
    original = RotaryEmbedding.get_emb

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
    RotaryEmbedding.get_emb = get_emb_on_cpu
