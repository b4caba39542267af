"""Fused elementwise ops (megatron/fusions.py) against float64 references: the compiled RoPE on
its own, and the whole GPT model's loss and gradients with every fusion on against the unfused
model. torch.compile runs on the CPU too (C++ instead of Triton), so the fused paths are
exercised here; the gpu-marked tests cover the CUDA kernels (ATen's fused RMSNorm included)."""

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.transformer_config import TransformerConfig
from test_model import (QWEN3, SEQ, build, config_for, cpu_only_unless_gpu_test,  # noqa: F401
                        reference_loss, tokens)

from megatron_averis.megatron import build_gpt_model, fusions
from megatron_averis.megatron.norm import RMSNorm
from megatron_averis.recipes import get_recipe


def rope_reference(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Float64 RoPE written as complex rotation: coordinate pairs (i, i + rot/2), or (2i, 2i + 1)
    when interleaved, are multiplied by exp(i·angle); dimensions past the rotated ones pass."""
    x = x.double()
    half = angles.shape[-1]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        re, im = rot[..., 0::2], rot[..., 1::2]
    else:
        re, im = rot[..., :half], rot[..., half:]
    z = torch.complex(re, im) * torch.polar(torch.ones_like(angles), angles)
    out = (torch.stack((z.real, z.imag), dim=-1).flatten(-2) if interleaved
           else torch.cat((z.real, z.imag), dim=-1))
    return torch.cat((out, rest), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("rot_fraction", [1, 2], ids=["full", "half-rotary"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2.5e-2)],
                         ids=["fp32", "bf16"])
def test_compiled_rope_matches_float64_reference(device, interleaved, rot_fraction, dtype, tol):
    s, b, heads, d = 12, 2, 3, 16
    half = d // rot_fraction // 2
    g = torch.Generator().manual_seed(3)
    inv_freq = 1.0 / 10_000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq  # [s, half]
    # megatron-core's freqs layout [s, 1, 1, rot]: angles repeated per pair.
    freqs = (angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1))
    freqs = freqs[:, None, None, :].float().to(device)
    x = torch.randn(s, b, heads, d, generator=g).to(device, dtype).requires_grad_()
    out = fusions.compiled_apply_rotary_pos_emb(x, freqs, interleaved=interleaved)
    x64 = x.detach().double().requires_grad_()
    ref = rope_reference(x64, angles[:, None, None, :].to(device), interleaved)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    grad = torch.randn(s, b, heads, d, generator=g).to(device, dtype)
    out.backward(grad)
    ref.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)


def test_rope_provider_fills_only_an_empty_slot(monkeypatch):
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    with pytest.raises(ValueError, match="apply_rope_fusion is not available"):
        config_for(QWEN3, apply_rope_fusion=True)  # megatron-core without Transformer Engine
    fusions.install_rope_fusion()
    assert rope_utils.fused_apply_rotary_pos_emb is fusions.compiled_apply_rotary_pos_emb
    assert config_for(QWEN3, apply_rope_fusion=True).apply_rope_fusion
    te_kernel = object()  # Transformer Engine's kernel, where installed, stays
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", te_kernel)
    fusions.install_rope_fusion()
    assert rope_utils.fused_apply_rotary_pos_emb is te_kernel


def test_config_fields_follow_device_and_precision(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_shapes", True)  # restored after
    asked = fusions.Fusions(rope=True, swiglu=True, cross_entropy=True)
    on = asked.config_fields(on_gpu=True, bf16=True)
    assert on == {"apply_rope_fusion": True, "bias_activation_fusion": True,
                  "cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "native"}
    assert not asked.config_fields(on_gpu=True, bf16=False)["cross_entropy_loss_fusion"]
    assert not any(v for k, v in asked.config_fields(on_gpu=False, bf16=True).items()
                   if k != "cross_entropy_fusion_impl")
    assert fusions.Fusions(rope=False, swiglu=False).config_fields(on_gpu=True, bf16=True) == {
        "apply_rope_fusion": False, "bias_activation_fusion": False,
        "cross_entropy_loss_fusion": False, "cross_entropy_fusion_impl": "native"}


def _graph_input_kinds(fn, shapes) -> list[list[str]]:
    """Per graph torch.compile builds while fn runs on tensors of `shapes`: the kinds of its
    graph inputs (a symbolic size shows up as a SymInt input)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([type(p.meta.get("example_value")).__name__
                       for p in gm.graph.nodes if p.op == "placeholder"])
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recording_backend)
    for shape in shapes:
        compiled(torch.ones(shape))
    torch._dynamo.reset()
    return graphs


def test_fused_ops_compile_each_shape_statically(monkeypatch):
    """A second shape (k after q under GQA, a second model) must not turn the compiled fusions
    into symbolic-size kernels; torch's default does, which this test shows first."""
    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_shapes", True)  # restored after
    shapes = [(4, 8), (6, 8), (10, 8)]

    def fn(x):
        return torch.nn.functional.silu(x) * 2

    default = _graph_input_kinds(fn, shapes)
    assert len(default) == 2 and "SymInt" in default[1]  # the second shape widened to symbolic
    fusions.Fusions(rope=False, swiglu=True).config_fields(on_gpu=True, bf16=True)
    static = _graph_input_kinds(fn, shapes)
    assert len(static) == 3 and not any("SymInt" in kinds for kinds in static)
    torch._dynamo.config.automatic_dynamic_shapes = True
    fusions.Fusions(rope=False, swiglu=False).config_fields(on_gpu=False, bf16=True)
    assert torch._dynamo.config.automatic_dynamic_shapes  # CPU runs compile nothing: untouched


class _Calls:
    """Counts calls of the fused providers megatron-core reaches through the config."""

    def __init__(self, monkeypatch):
        from megatron.core.models.common.language_module import language_module
        from megatron.core.transformer import mlp

        self.counts = {"rope": 0, "swiglu": 0, "cross_entropy": 0}
        fusions.install_rope_fusion()
        for module, name, key in ((rope_utils, "fused_apply_rotary_pos_emb", "rope"),
                                  (mlp, "bias_swiglu_impl", "swiglu"),
                                  (language_module, "fused_vocab_parallel_cross_entropy",
                                   "cross_entropy")):
            monkeypatch.setattr(module, name, self._counting(getattr(module, name), key))

    def _counting(self, fn, key):
        def counted(*args, **kwargs):
            self.counts[key] += 1
            return fn(*args, **kwargs)
        return counted


def _loss_and_grads(model, arch):
    ids, labels, pos = tokens(arch)
    loss = model(ids, pos, None, labels=labels)
    loss.mean().backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _build(arch, **fields):
    torch.manual_seed(0)
    return build_gpt_model(config_for(arch, **fields), get_recipe("bf16"), vocab_size=arch.vocab,
                           max_seq_len=SEQ, qk_layernorm=arch.qk_norm, rotary_base=arch.rope_base,
                           share_embeddings_and_output_weights=arch.tied)


def test_fused_model_matches_unfused_and_float64(mcore_single_process, monkeypatch):
    """Qwen3-like (q/k norms, grouped queries, tied output): FP32 parameters, so the unfused
    model is exact to FP32 and every difference is the fusions'."""
    arch = QWEN3
    unfused = build(arch, get_recipe("bf16"))
    ref_loss, ref_grads = _loss_and_grads(unfused, arch)
    calls = _Calls(monkeypatch)
    no_ce = fusions.Fusions(rope=True, swiglu=True).config_fields(on_gpu=True, bf16=True)
    loss, grads = _loss_and_grads(_build(arch, **no_ce), arch)
    assert calls.counts["rope"] == 2 * arch.layers and calls.counts["swiglu"] == arch.layers
    float64 = reference_loss(arch, dict(unfused.named_parameters()), *tokens(arch)[:2])
    torch.testing.assert_close(loss.double(), float64, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Fused cross entropy: megatron-core's kernel returns BF16 logit gradients, so parameter
    # gradients agree to BF16 rounding (relative 2^-8), the loss to FP32.
    all_on = fusions.Fusions(cross_entropy=True).config_fields(on_gpu=True, bf16=True)
    loss, grads = _loss_and_grads(_build(arch, **all_on), arch)
    assert calls.counts["cross_entropy"] == 1
    torch.testing.assert_close(loss.double(), float64, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        err = (g - ref_grads[name]).norm() / ref_grads[name].norm()
        assert err < 2 ** -8, (name, err.item())


@pytest.mark.gpu
def test_rms_norm_runs_atens_fused_cuda_kernel():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               normalization="RMSNorm", params_dtype=torch.bfloat16, bf16=True)
    norm = RMSNorm(config, hidden_size=64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    x = torch.randn(8, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with Ops() as ops:
        y = norm(x)
        y.backward(torch.ones_like(y))
    assert "aten._fused_rms_norm.default" in ops.seen
    assert "aten._fused_rms_norm_backward.default" in ops.seen
    x64, w64 = x.detach().double(), norm.weight.detach().double()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_fused_cuda_model_matches_unfused(mcore_single_process):
    """BF16 on the GPU, as the trainer runs it: the torch.compile'd (Triton) fusions against
    megatron-core's unfused ops on the same weights."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    def run(fields):
        model_parallel_cuda_manual_seed(0)
        config = config_for(QWEN3, bf16=True, params_dtype=torch.bfloat16, **fields)
        config.use_cpu_initialization = False
        model = build_gpt_model(config, get_recipe("bf16"), vocab_size=QWEN3.vocab,
                                max_seq_len=SEQ, qk_layernorm=True, rotary_base=QWEN3.rope_base,
                                share_embeddings_and_output_weights=True)
        ids, labels, pos = (t.cuda() for t in tokens(QWEN3))
        loss = model(ids, pos, None, labels=labels)
        loss.mean().backward()
        return loss.float(), {n: p.grad.float() for n, p in model.named_parameters()}

    fused = fusions.Fusions(cross_entropy=True).config_fields(on_gpu=True, bf16=True)
    unfused = fusions.Fusions(rope=False, swiglu=False).config_fields(on_gpu=True, bf16=True)
    loss, grads = run(fused)
    ref_loss, ref_grads = run(unfused)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for name, g in grads.items():
        err = (g - ref_grads[name]).norm() / ref_grads[name].norm()
        assert err < 3e-2, (name, err.item())
