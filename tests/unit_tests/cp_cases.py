"""Workers for the context-parallel tests (CPU/gloo and GPU/NCCL): SDPACoreAttention and a tiny
GPT on this CP rank's share of the sequence. Every rank builds the same full tensors from a fixed
seed and keeps its tokens with megatron-core's own get_batch_on_this_cp_rank, so the layout under
test is mcore's, not ours."""

from __future__ import annotations

import torch

from parallel_model_cases import BATCH, SEQ, VOCAB, _config

ATTN_SEQ, ATTN_BATCH, HEAD_DIM = 16, 2, 8
# (name, query heads, key/value groups, mask type, with an explicit [b, 1, s, s] mask)
ATTN_CASES = (("causal_gqa", 4, 2, "causal", False),
              ("causal_mha", 4, 4, "causal", False),
              ("padding_causal_gqa", 4, 2, "padding_causal", True),
              ("no_mask_mqa", 4, 1, "no_mask", False))


def attention_inputs(heads, groups, with_mask, seed=0):
    """Full-sequence q [s, b, h, d], k/v [s, b, g, d], upstream gradient, bool mask (True = masked)
    hiding a few keys per batch element (document-boundary-like), or None."""
    g = torch.Generator().manual_seed(seed)
    s, b, d = ATTN_SEQ, ATTN_BATCH, HEAD_DIM
    q = torch.randn(s, b, heads, d, generator=g)
    k = torch.randn(s, b, groups, d, generator=g)
    v = torch.randn(s, b, groups, d, generator=g)
    grad = torch.randn(s, b, heads * d, generator=g)
    mask = None
    if with_mask:
        mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
        mask[0, :, 9:, :5] = True  # queries 9.. of sequence 0 do not see keys 0..4
        mask[1, :, :, 3] = True  # key 3 of sequence 1 is padding
    return q, k, v, grad, mask


def _cp_slice(cp_group, seq_first=(), **batch):
    """mcore's get_batch_on_this_cp_rank; tensors named in seq_first are [s, ...] and are moved
    to [b, s, ...] (the layout it expects) and back."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = {n: (t.transpose(0, 1) if n in seq_first else t) for n, t in batch.items()}
    batch = get_batch_on_this_cp_rank(batch, cp_group)
    return {n: (t.transpose(0, 1).contiguous() if n in seq_first else t) for n, t in batch.items()}


def attention_worker(rank, world, device_type):
    """Every ATTN_CASE on this CP rank: output and q/k/v gradients of its tokens, and the global
    positions of those tokens (sliced by mcore from arange)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_averis.megatron.attention import SDPACoreAttention

    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=world)
    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        cp_group = parallel_state.get_context_parallel_group()
        results = {}
        for name, heads, groups, mask_type, with_mask in ATTN_CASES:
            q, k, v, grad, mask = attention_inputs(heads, groups, with_mask)
            pos = torch.arange(ATTN_SEQ).expand(ATTN_BATCH, ATTN_SEQ)
            local = _cp_slice(cp_group, seq_first=("q", "k", "v", "grad"), q=q, k=k, v=v,
                              grad=grad, pos=pos, attention_mask=mask)
            config = TransformerConfig(num_layers=1, hidden_size=heads * HEAD_DIM,
                                       num_attention_heads=heads, num_query_groups=groups,
                                       kv_channels=HEAD_DIM, attention_dropout=0.0,
                                       use_cpu_initialization=True, context_parallel_size=world)
            attn = SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType[mask_type],
                                     attention_type="self")
            q, k, v = (local[n].to(device).requires_grad_() for n in ("q", "k", "v"))
            m = local["attention_mask"]
            out = attn(q, k, v, None if m is None else m.to(device))
            out.backward(local["grad"].to(device))
            results[name] = {"pos": local["pos"][0], "out": out.detach().cpu(),
                             **{f"d{n}": t.grad.cpu() for n, t in zip("qkv", (q, k, v))}}
        return results
    finally:
        parallel_state.destroy_model_parallel()


def gpt_worker(rank, world, recipe_names, device_type):
    """A tiny GPT (parallel_model_cases' config, TP=1) at CP=world, once per recipe (same seed):
    per-token losses of this rank's tokens, their global positions, and the linear-weight
    gradients of sum(losses) over this rank's tokens (summed over the CP group they are the
    full-sequence gradients, as Megatron's DP×CP gradient reduction sums them)."""
    import dataclasses

    from megatron.core import parallel_state, tensor_parallel

    from megatron_averis.megatron import build_gpt_model
    from megatron_averis.recipes import get_recipe

    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=world)
    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        pos = torch.arange(SEQ).expand(BATCH, SEQ)
        local = _cp_slice(parallel_state.get_context_parallel_group(), tokens=ids[:, :-1],
                          labels=ids[:, 1:], position_ids=pos)
        local = {n: t.to(device) for n, t in local.items()}
        config = dataclasses.replace(_config(1, device_type), context_parallel_size=world)
        results = {}
        for recipe_name in recipe_names:
            torch.manual_seed(0)
            if device_type == "cuda":
                tensor_parallel.model_parallel_cuda_manual_seed(0)
            model = build_gpt_model(config, get_recipe(recipe_name), vocab_size=VOCAB,
                                    max_seq_len=SEQ, qk_layernorm=True, rotary_base=1e6,
                                    share_embeddings_and_output_weights=False).to(device)
            loss = model(local["tokens"], local["position_ids"], None, labels=local["labels"])
            loss.sum().backward()
            grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()
                     if p.grad is not None and "linear_" in n}
            results[recipe_name] = {"loss": loss.detach().cpu(),
                                    "pos": local["position_ids"][0].cpu(), "grads": grads}
        return results
    finally:
        parallel_state.destroy_model_parallel()
