"""A tiny Qwen3-like GPT under a given TP/SP layout, one forward + backward, for the
TP=1 vs TP=2+SP equivalence tests (CPU/gloo and GPU/NCCL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 128, 128, 2
SEQ, BATCH = 32, 2


def _config(tp, device_type):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=HEAD_DIM, ffn_hidden_size=FFN, normalization="RMSNorm", layernorm_epsilon=1e-6,
        qk_layernorm=True, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, params_dtype=torch.float32)


def model_worker(rank, world, recipe_name, device_type):
    """Returns per-token losses, linear-weight gradients and every quantized operand."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_averis.megatron import build_gpt_model
    from megatron_averis.recipes import get_recipe

    parallel_state.initialize_model_parallel(world, 1)
    try:
        torch.manual_seed(0)
        if device_type == "cuda":
            tensor_parallel.model_parallel_cuda_manual_seed(0)
        model = build_gpt_model(_config(world, device_type), get_recipe(recipe_name),
                                vocab_size=VOCAB, max_seq_len=SEQ, qk_layernorm=True,
                                rotary_base=1e6, share_embeddings_and_output_weights=False)
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        model.to(device)
        ops = {}
        for name, module in model.named_modules():
            ctx = getattr(module, "linear_ctx", None)
            if ctx is not None:
                ctx.observer = (lambda n: lambda role, op: ops.__setitem__(
                    (n, role), op.dequantize(unrotate=False).cpu()))(name)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g).to(device)
        pos = torch.arange(SEQ, device=device).expand(BATCH, SEQ)
        loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:])
        loss.sum().div(loss.numel()).backward()
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()
                 if p.grad is not None and "linear_" in n}
        return {"loss": loss.detach().cpu(), "grads": grads, "ops": ops}
    finally:
        parallel_state.destroy_model_parallel()


def _glu_rows(n_full, rank, world):
    half, part = n_full // 2, n_full // 2 // world
    idx = torch.arange(rank * part, (rank + 1) * part)
    return torch.cat([idx, idx + half])


def shard_index(name, role_or_grad, shape_full, rank, world, tokens):
    """Index (rows, cols) of the TP=1 tensor that rank `rank` of a TP=world+SP run holds.

    Column layers (linear_qkv, linear_fc1) split out-features, row layers (linear_proj,
    linear_fc2) split in-features; under SP, token-split operands are gathered before their GEMM
    so they compare whole. fc1's shards hold [gate_r, up_r]."""
    full = slice(None)
    column = "linear_qkv" in name or "linear_fc1" in name
    if column:
        n = shape_full
        out = _glu_rows(n, rank, world) if "linear_fc1" in name else \
            torch.arange(rank * n // world, (rank + 1) * n // world)
        return {"grad": (out, full), "fprop_input": (full, full), "fprop_weight": (out, full),
                "dgrad_grad": (full, out), "dgrad_weight": (full, out),
                "wgrad_grad": (out, full), "wgrad_input": (full, full)}[role_or_grad]
    k = shape_full
    cols = torch.arange(rank * k // world, (rank + 1) * k // world)
    return {"grad": (full, cols), "fprop_input": (full, cols), "fprop_weight": (full, cols),
            "dgrad_grad": (full, full), "dgrad_weight": (cols, full),
            "wgrad_grad": (full, full), "wgrad_input": (cols, full)}[role_or_grad]


def take(t, index):
    rows, cols = index
    if isinstance(rows, torch.Tensor):
        t = t[rows]
    if isinstance(cols, torch.Tensor):
        t = t[:, cols]
    return t
