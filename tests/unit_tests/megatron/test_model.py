"""Tiny Qwen3-like and Llama-like GPTModels: parameter count by hand, float64 reference forward,
forward + backward under BF16 and FP4 recipes."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_averis.megatron import build_gpt_model
from megatron_averis.megatron.parallel_linear import (
    AverisColumnParallelLinear,
    AverisRowParallelLinear,
)
from megatron_averis.recipes import get_recipe


@dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    qk_norm: bool
    tied: bool
    rope_base: float


# Qwen3: q/k RMSNorm, head_dim independent of hidden/heads, tied embeddings (small sizes).
QWEN3 = Arch(layers=3, hidden=64, heads=4, groups=2, head_dim=32, ffn=96, vocab=128, qk_norm=True,
             tied=True, rope_base=1_000_000.0)
# Llama: no q/k norm, head_dim = hidden/heads, separate output layer.
LLAMA = Arch(layers=2, hidden=64, heads=4, groups=1, head_dim=16, ffn=160, vocab=96, qk_norm=False,
             tied=False, rope_base=10_000.0)
EPS = 1e-6
SEQ, BATCH = 16, 2


def config_for(a: Arch, **kw) -> TransformerConfig:
    return TransformerConfig(
        num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
        num_query_groups=a.groups, kv_channels=a.head_dim, ffn_hidden_size=a.ffn,
        normalization="RMSNorm", layernorm_epsilon=EPS, qk_layernorm=a.qk_norm,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, **kw)


def build(a: Arch, recipe, **kw):
    torch.manual_seed(0)
    return build_gpt_model(config_for(a), recipe, vocab_size=a.vocab, max_seq_len=SEQ,
                           qk_layernorm=a.qk_norm, rotary_base=a.rope_base,
                           share_embeddings_and_output_weights=a.tied, **kw)


@pytest.fixture(autouse=True)
def cpu_only_unless_gpu_test(request, monkeypatch):
    """The CPU-model tests also run on GPU machines: hide CUDA from them so that megatron-core
    keeps RoPE on the CPU (the gpu-marked test covers the CUDA model)."""
    if "gpu" not in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def expected_parameter_count(a: Arch) -> int:
    q, kv = a.heads * a.head_dim, a.groups * a.head_dim
    per_layer = (
        a.hidden                          # input RMSNorm
        + a.hidden * (q + 2 * kv)         # fused q, k, v projection
        + (2 * a.head_dim if a.qk_norm else 0)  # q and k RMSNorm over one head
        + q * a.hidden                    # attention output projection
        + a.hidden                        # pre-MLP RMSNorm
        + a.hidden * 2 * a.ffn            # SwiGLU gate and up projections
        + a.ffn * a.hidden                # down projection
    )
    embeddings = a.vocab * a.hidden * (1 if a.tied else 2)
    return embeddings + a.layers * per_layer + a.hidden  # + final RMSNorm


def tokens(a: Arch):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, a.vocab, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:], torch.arange(SEQ).expand(BATCH, SEQ)


def reference_loss(a: Arch, params: dict, ids, labels):
    """Per-token cross entropy of the architecture, written out in float64 from the weights.

    Weight layouts of megatron-core: the fused QKV output is grouped per key/value group as
    [q heads of the group, k, v]; the SwiGLU fc1 output is [gate, up]."""
    p = {k: v.detach().double() for k, v in params.items()}

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    d, rep = a.head_dim, a.heads // a.groups
    inv_freq = 1.0 / a.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(SEQ, dtype=torch.float64)[:, None] * inv_freq  # [s, d/2]
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rope(x):  # x [b, s, heads, d]; rotate pairs (i, i + d/2)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    x = p["embedding.word_embeddings.weight"][ids]  # [b, s, h]
    for i in range(a.layers):
        pre = f"decoder.layers.{i}."
        h = rms(x, p[pre + "input_layernorm.weight"])
        qkv = (h @ p[pre + "self_attention.linear_qkv.weight"].T).view(BATCH, SEQ, a.groups, (rep + 2) * d)
        q = qkv[..., : rep * d].reshape(BATCH, SEQ, a.heads, d)
        k, v = qkv[..., rep * d:(rep + 1) * d], qkv[..., (rep + 1) * d:]
        if a.qk_norm:
            q = rms(q, p[pre + "self_attention.q_layernorm.weight"])
            k = rms(k, p[pre + "self_attention.k_layernorm.weight"])
        q, k = rope(q), rope(k)
        heads_out = []
        for head in range(a.heads):
            g = head // rep
            scores = q[:, :, head] @ k[:, :, g].transpose(1, 2) / math.sqrt(d)  # [b, s, s]
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            heads_out.append(probs @ v[:, :, g])
        x = x + torch.cat(heads_out, dim=-1) @ p[pre + "self_attention.linear_proj.weight"].T
        h = rms(x, p[pre + "pre_mlp_layernorm.weight"])
        gate, up = (h @ p[pre + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ p[pre + "mlp.linear_fc2.weight"].T
    x = rms(x, p["decoder.final_layernorm.weight"])
    out_w = p["embedding.word_embeddings.weight" if a.tied else "output_layer.weight"]
    logits = x @ out_w.T
    return F.cross_entropy(logits.reshape(-1, a.vocab), labels.reshape(-1), reduction="none").view(BATCH, SEQ)


@pytest.mark.parametrize("arch", [QWEN3, LLAMA], ids=["qwen3", "llama"])
def test_bf16_model_matches_float64_reference(mcore_single_process, arch):
    model = build(arch, get_recipe("bf16"))
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(arch)
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.linear_qkv, AverisColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc2, AverisRowParallelLinear)
    ids, labels, pos = tokens(arch)
    loss = model(ids, pos, None, labels=labels)
    assert loss.shape == (BATCH, SEQ)
    ref = reference_loss(arch, dict(model.named_parameters()), ids, labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bf16_parameters_stay_close_to_float64_reference(mcore_single_process):
    torch.manual_seed(0)
    config = config_for(QWEN3, bf16=True, params_dtype=torch.bfloat16)
    model = build_gpt_model(config, get_recipe("bf16"), vocab_size=QWEN3.vocab, max_seq_len=SEQ,
                            qk_layernorm=True, rotary_base=QWEN3.rope_base,
                            share_embeddings_and_output_weights=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, labels, pos = tokens(QWEN3)
    loss = model(ids, pos, None, labels=labels)
    ref = reference_loss(QWEN3, dict(model.named_parameters()), ids, labels)
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=0.02)
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fp4_model_runs_forward_backward_with_bf16_edge_layers(mcore_single_process):
    recipe = get_recipe("averis", ["bf16_first_layers=1"])
    model = build(QWEN3, recipe)
    assert [layer.mlp.linear_fc1.recipe.is_bf16 for layer in model.decoder.layers] == [True, False, False]
    bf16_model = build(QWEN3, get_recipe("bf16"))
    bf16_model.load_state_dict(model.state_dict())
    ids, labels, pos = tokens(QWEN3)
    loss = model(ids, pos, None, labels=labels).mean()
    with torch.no_grad():
        bf16_loss = bf16_model(ids, pos, None, labels=labels).mean()
    assert torch.isfinite(loss)
    # FP4 GEMMs perturb the loss, but only a little on the same weights.
    assert loss.item() != bf16_loss.item()
    assert abs(loss.item() - bf16_loss.item()) < 0.05 * bf16_loss.item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_plain_mcore_linears_through_linear_classes(mcore_single_process):
    class Col(ColumnParallelLinear):
        def __init__(self, *args, recipe=None, **kw):
            assert recipe is not None
            super().__init__(*args, **kw)

    class Row(RowParallelLinear):
        def __init__(self, *args, recipe=None, **kw):
            assert recipe is not None
            super().__init__(*args, **kw)

    model = build(LLAMA, get_recipe("bf16"), linear_classes=(Col, Row))
    assert type(model.decoder.layers[0].self_attention.linear_proj) is Row
    ids, labels, pos = tokens(LLAMA)
    loss = model(ids, pos, None, labels=labels)
    ref = reference_loss(LLAMA, dict(model.named_parameters()), ids, labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_pipeline_stage_without_embedding_or_output(mcore_single_process):
    model = build(LLAMA, get_recipe("bf16"), pre_process=False, post_process=False)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith(("embedding.", "output_layer.")) for n in names)
    hidden = torch.randn(SEQ, BATCH, LLAMA.hidden, requires_grad=True)
    model.set_input_tensor(hidden)
    _, _, pos = tokens(LLAMA)
    out = model(None, pos, None)
    assert out.shape == (SEQ, BATCH, LLAMA.hidden)
    out.sum().backward()
    assert torch.isfinite(hidden.grad).all()


def test_vocab_not_divisible_by_tp_is_refused(mcore_single_process):
    config = config_for(LLAMA, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="pad the vocabulary"):
        build_gpt_model(config, get_recipe("bf16"), vocab_size=97, max_seq_len=SEQ, qk_layernorm=False,
                        rotary_base=10_000, share_embeddings_and_output_weights=False)


@pytest.mark.gpu
def test_cuda_model_matches_float64_reference(mcore_single_process):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)  # GPU initialisation draws from mcore's CUDA RNG tracker
    config = config_for(QWEN3, bf16=True, params_dtype=torch.bfloat16)
    config.use_cpu_initialization = False
    model = build_gpt_model(config, get_recipe("averis"), vocab_size=QWEN3.vocab, max_seq_len=SEQ,
                            qk_layernorm=True, rotary_base=QWEN3.rope_base,
                            share_embeddings_and_output_weights=True)
    assert all(p.is_cuda for p in model.parameters())
    ids, labels, pos = tokens(QWEN3)
    loss = model(ids.cuda(), pos.cuda(), None, labels=labels.cuda())
    params = {n: p.detach().cpu() for n, p in model.named_parameters()}
    ref = reference_loss(QWEN3, params, ids, labels)
    assert torch.isfinite(loss).all()
    assert abs(loss.mean().item() - ref.mean().item()) < 0.05 * ref.mean().item()
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_every_recipe_starts_from_the_same_weights(mcore_single_process):
    """Recipe comparisons (docs/results.md) need one initialisation: building the model under any
    recipe draws the same random numbers in the same order (RHT signs and SR seeds come from
    their own generators), so the weights equal the BF16 model's bit for bit."""
    weights = {}
    for name in ("bf16", "nvfp4-plain", "nvfp4-nohadamard", "nvfp4", "averis", "averis-rht"):
        model = build(QWEN3, get_recipe(name))
        weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()
                         if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    ref = weights.pop("bf16")
    assert ref
    for name, w in weights.items():
        assert w.keys() == ref.keys(), name
        for k in ref:
            assert torch.equal(w[k], ref[k]), (name, k)
