"""The plugin route: Megatron-LM's pretrain_gpt.py with `--spec megatron_averis.megatron.spec NAME`.

The spec is imported the way Megatron-LM's gpt_builder imports it (megatron-core's
spec_utils.import_module) and GPTModel is built from it as gpt_builder builds it; the model must
compute the float64 reference of the architecture and carry the named recipe in every linear.
"""

import pytest
import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import import_module
from test_model import LLAMA, QWEN3, SEQ, config_for, expected_parameter_count, reference_loss, tokens

from megatron_averis.megatron import cpu_compat
from megatron_averis.megatron.norm import RMSNorm
from megatron_averis.megatron.parallel_linear import AverisColumnParallelLinear, AverisRowParallelLinear
from megatron_averis.recipes import PRESETS


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_compat.install()


def megatron_lm_model(arch, name):
    spec = import_module(("megatron_averis.megatron.spec", name))
    torch.manual_seed(0)
    return GPTModel(config=config_for(arch), transformer_layer_spec=spec, vocab_size=arch.vocab,
                    max_sequence_length=SEQ, parallel_output=True,
                    share_embeddings_and_output_weights=arch.tied, position_embedding_type="rope",
                    rotary_percent=1.0, rotary_base=arch.rope_base)


@pytest.mark.parametrize("arch", [QWEN3, LLAMA], ids=["qwen3", "llama"])
def test_spec_route_matches_float64_reference(mcore_single_process, arch):
    model = megatron_lm_model(arch, "bf16")
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(arch)
    attention = model.decoder.layers[0].self_attention
    assert isinstance(attention.q_layernorm, RMSNorm if arch.qk_norm else IdentityOp)
    ids, labels, pos = tokens(arch)
    loss = model(ids, pos, None, labels=labels)
    params = dict(model.named_parameters())
    torch.testing.assert_close(loss.double(), reference_loss(arch, params, ids, labels),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n.replace("-", "_") for n in PRESETS])
def test_every_preset_is_a_spec_name(mcore_single_process, name):
    model = megatron_lm_model(QWEN3, name)
    for layer in model.decoder.layers:
        for linear, cls in ((layer.self_attention.linear_qkv, AverisColumnParallelLinear),
                            (layer.self_attention.linear_proj, AverisRowParallelLinear),
                            (layer.mlp.linear_fc1, AverisColumnParallelLinear),
                            (layer.mlp.linear_fc2, AverisRowParallelLinear)):
            assert isinstance(linear, cls) and linear.recipe.name.replace("-", "_") == name


def test_averis_spec_trains_a_step(mcore_single_process):
    model = megatron_lm_model(QWEN3, "averis")
    ids, labels, pos = tokens(QWEN3)
    loss = model(ids, pos, None, labels=labels).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
