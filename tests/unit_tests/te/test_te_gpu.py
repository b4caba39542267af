"""The adapter inside Transformer Engine (GPU + TE >= 2.20; skipped elsewhere).

Run: python3 -m pytest -q -m gpu tests/unit_tests/te   (with TE installed, see
docs/transformer-engine.md for the Hopper kit).

Tolerances. Quantized operands are compared exactly (dequantized in FP64: codes, block scales,
tensor scale, mean). GEMM outputs of the same operands may differ only by FP32 accumulation
order (cuBLAS may pick other kernels for other shapes or call sites) and the BF16 rounding of the
result: |Δ| ≤ 2⁻⁸·|ref| + 1e-5·max|ref| elementwise (one BF16 rounding step, plus FP32 order).
Across TP ranks the row-parallel output is a BF16 sum of per-rank partials (split K), so TP
outputs are compared by relative Frobenius norm ≤ 1e-2 instead.
"""

import pytest
import torch

from megatron_averis.linear import QuantizedLinear
from megatron_averis.recipes import get_recipe
from te_cases import TP_SLICES, run_te_linear, te_linear, te_tp_worker
from tp_harness import run_world

pytestmark = pytest.mark.gpu
PRESETS = ["averis", "averis-rht", "nvfp4-plain", "nvfp4-nohadamard", "nvfp4"]
OPERAND_ROLES = {"fprop": ("fprop_input", "fprop_weight"), "dgrad": ("dgrad_grad", "dgrad_weight"),
                 "wgrad": ("wgrad_grad", "wgrad_input")}


def _te():
    te = pytest.importorskip("transformer_engine.pytorch")
    recipe = pytest.importorskip("transformer_engine.common.recipe")
    return te, recipe


def assert_close_bf16(got, want, what):
    got, want = got.float(), want.float()
    tol = 2.0 ** -8 * want.abs() + 1e-5 * want.abs().max()
    bad = (got - want).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements beyond tolerance"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(s, b, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(s, b, k, generator=g) * torch.linspace(0.2, 2, k) + 2.0).bfloat16()
    dy = (torch.randn(s, b, n, generator=g) - 1.0).bfloat16()
    return x, dy


@pytest.mark.parametrize("name", PRESETS)
def test_te_linear_matches_quantized_linear(name):
    """te.Linear under the Averis CustomRecipe and our QuantizedLinear, same weights, inputs
    and stochastic-rounding stream, two steps: identical operands, outputs and gradients within
    the stated tolerance."""
    _, R = _te()
    from megatron_averis.te.factories import QFactory

    torch.manual_seed(0)
    s, b, k, n = 32, 2, 128, 256
    ref = QuantizedLinear(k, n, bias=False, recipe=name, device="cuda", dtype=torch.bfloat16,
                          stream_id=0)
    seen = {}
    ref.ctx.observer = lambda role, op: seen.__setitem__(role, op.dequantize().cpu())
    module = te_linear(k, n)
    with torch.no_grad():
        module.weight.copy_(ref.weight)
    recipe = R.CustomRecipe(qfactory=QFactory(name, first_stream=0))
    for step in range(2):
        x, dy = (t.cuda() for t in _inputs(s, b, k, n, seed=step))
        module.weight.grad, ref.weight.grad = None, None
        y, dx, dw, ops = run_te_linear(module, recipe, x, dy)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(dy)
        for gemm, roles in OPERAND_ROLES.items():
            for got, role in zip(ops[gemm], roles):
                assert torch.equal(got, seen[role]), f"step {step}: {role} operand differs"
        assert_close_bf16(y, yr.detach().cpu(), f"step {step} y")
        assert_close_bf16(dx, xr.grad.cpu(), f"step {step} dx")
        assert_close_bf16(dw, ref.weight.grad.cpu(), f"step {step} dw")


@pytest.mark.parametrize("mode", ["column", "row"])
@pytest.mark.parametrize("name", ["averis", "nvfp4"])
def test_te_tp2_sequence_parallel_matches_tp1(mode, name):
    """TE Linear at TP=2 + sequence parallelism (NCCL, 2 GPUs) against TP=1: every rank's
    GEMM operands are its slice of TP=1's (group-wide amax, TP=1 stochastic-rounding
    positions, whole tensors after TE's high-precision all-gather)."""
    _, R = _te()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from megatron_averis.te.factories import QFactory

    world, s, b, k, n = 2, 32, 2, 128, 256
    torch.manual_seed(1)
    w = (torch.randn(n, k) * 0.05).bfloat16()
    x, dy = _inputs(s, b, k, n, seed=3)
    module = te_linear(k, n)
    with torch.no_grad():
        module.weight.copy_(w.cuda())
    y1, dx1, dw1, ops1 = run_te_linear(module, R.CustomRecipe(qfactory=QFactory(name, 0)),
                                       x.cuda(), dy.cuda())
    results = run_world(world, te_tp_worker, name, mode, w, x, dy, backend="nccl")
    tok = lambda t, r: t.chunk(world, 0)[r]  # noqa: E731  (sequence shards, dim 0)
    for rank, (y, dx, dw, ops) in enumerate(results):
        for gemm, sides in TP_SLICES[mode].items():
            for side, (dim, split) in enumerate(sides):
                want = ops1[gemm][side].chunk(world, dim)[rank] if split else ops1[gemm][side]
                assert torch.equal(ops[gemm][side], want), f"rank {rank} {gemm} operand {side}"
        if mode == "column":
            wants = (y1.chunk(world, -1)[rank], tok(dx1, rank), dw1.chunk(world, 0)[rank])
        else:
            wants = (tok(y1, rank), dx1.chunk(world, -1)[rank], dw1.chunk(world, 1)[rank])
        for got, want, what in zip((y, dx, dw), wants, ("y", "dx", "dw")):
            assert rel(got, want) <= 1e-2, f"rank {rank} {what}: rel err {rel(got, want):.2e}"


@pytest.mark.parametrize("kind,name,tile", [("input", "nvfp4-plain", (1, 16)),
                                            ("weight", "nvfp4", (16, 16))])
def test_adapter_quantizer_matches_te_reference(kind, name, tile):
    """TE's NVFP4 reference quantizer and the adapter's TE quantizer on the same tensor: the
    codes and E4M3 scales TE's GEMM dispatch reads (data/scale, data_t/scale_t) are identical.
    Extends numerics/test_te_reference.py to the storages TE receives from the adapter."""
    _te()
    from transformer_engine.pytorch.custom_recipes import reference_nvfp4, reference_utils
    from transformer_engine.pytorch.quantization import QuantizerRole

    from megatron_averis.te.factories import QFactory

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=g) * torch.logspace(-3, 1, 512).view(1, -1)
    x[:, 7] += 30.0
    x = x.to("cuda", torch.bfloat16)
    ref = reference_nvfp4.NVFP4QuantizerRef(dtype=reference_utils.Fp4Formats.E2M1, rowwise=True,
                                            columnwise=True, quant_tile_shape=tile, with_rht=False)
    te_out = ref.quantize(x)
    with pytest.warns(UserWarning, match="could not find the TE module"):
        q = QFactory(name)(QuantizerRole(module_type="linear", tensor_type=kind))
    q.set_usage(rowwise=True, columnwise=True)
    ours = q.quantize(x)
    for data, scale, te_data, te_scale in ((ours.data, ours.scale, te_out.data, te_out.scale),
                                           (ours.data_t, ours.scale_t, te_out.data_t, te_out.scale_t)):
        assert torch.equal(data, te_data.view(torch.uint8)), "FP4 codes differ"
        s = scale.float().repeat_interleave(tile[0], dim=0)
        assert torch.equal(s, te_scale.float()[: s.shape[0], : s.shape[1]]), "scales differ"


@pytest.fixture
def mcore_cuda(tmp_path):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _te_gpt(recipe, fields: dict):
    """A 3-layer GPTModel of megatron-core's TE spec under `recipe` with these TE config fields."""
    import torch.nn.functional as F
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_averis.te.model import build_te_gpt_model

    model_parallel_cuda_manual_seed(1234)
    cfg = TransformerConfig(
        num_layers=3, hidden_size=128, num_attention_heads=4, num_query_groups=2,
        kv_channels=32, ffn_hidden_size=256, normalization="RMSNorm", qk_layernorm=True,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16,
        gradient_accumulation_fusion=False, calculate_per_token_loss=True, **fields)
    return build_te_gpt_model(cfg, recipe, vocab_size=256, max_seq_len=64, qk_layernorm=True,
                              rotary_base=10000.0, share_embeddings_and_output_weights=True).cuda()


def _loss_and_grads(model) -> float:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 64), generator=g).cuda()
    labels = torch.roll(tokens, -1, 1)
    position_ids = torch.arange(64, device="cuda").expand(2, 64)
    loss = model(tokens, position_ids, None, labels=labels).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return loss.item()


def _linears(layer):
    return (layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
            layer.mlp.linear_fc1, layer.mlp.linear_fc2)


def test_trainer_te_spec_runs_the_recipe(mcore_cuda):
    """--transformer-impl transformer_engine's model: megatron-core's TE GPT layers enter the
    recipe through get_fp4_context; every linear's quantizers are ours, BF16 edge layers keep
    TE's high precision, and the loss is the BF16 model's within FP4 noise."""
    _te()
    from megatron_averis.te.model import te_config_fields
    from megatron_averis.te.quantizer import AverisQuantizer

    losses = {}
    for name, overrides in (("bf16", ()), ("averis", ("bf16_last_layers=1",))):
        recipe = get_recipe(name, list(overrides))
        model = _te_gpt(recipe, te_config_fields(recipe))
        losses[name] = _loss_and_grads(model)
        if name == "averis":
            for i, layer in enumerate(model.decoder.layers):
                for lin in _linears(layer):
                    fwd = getattr(lin, "quantizers", {}).get("scaling_fwd") or []
                    ours = any(isinstance(q, AverisQuantizer) for q in fwd)
                    assert ours == (i < 2), f"layer {i}: Averis quantizers {ours}"
    assert abs(losses["averis"] - losses["bf16"]) <= 0.05 * abs(losses["bf16"])


def test_blackwell_dispatch_with_te_reference(mcore_cuda, monkeypatch):
    """The dispatch's Transformer Engine NVFP4BlockScaling route on a GPU without FP4 tensor
    cores: the hardware check answers yes and TE's Python reference of NVFP4BlockScaling stands
    in for its kernels (te_nvfp4_backend="reference"). nvfp4 then runs TE's reference quantizers
    in every linear, averis still ours (the CustomRecipe route), and both losses are the BF16 model's within FP4 noise."""
    _te()
    from transformer_engine.pytorch.custom_recipes.reference_nvfp4 import NVFP4QuantizerRef

    from megatron_averis.te import native
    from megatron_averis.te.model import te_config_fields
    from megatron_averis.te.quantizer import AverisQuantizer

    monkeypatch.setattr(native, "hardware_fp4", lambda device: True)
    losses = {}
    for name, quantizer in (("bf16", None), ("nvfp4", NVFP4QuantizerRef),
                            ("averis", AverisQuantizer)):
        # nvfp4 asks for the hardware (auto); averis keeps its residual GEMMs emulated (dequant),
        # as the patched check would otherwise send them to an FP4 GEMM this GPU lacks.
        recipe = get_recipe(name, ["fp4_gemm=auto"] if name == "nvfp4" else [])
        model = _te_gpt(recipe, te_config_fields(recipe, "cuda", te_nvfp4_backend="reference"))
        losses[name] = _loss_and_grads(model)
        if quantizer is not None:
            for layer in model.decoder.layers:
                for lin in _linears(layer):
                    fwd = getattr(lin, "quantizers", {}).get("scaling_fwd") or []
                    assert any(isinstance(q, quantizer) for q in fwd), (name, type(lin).__name__)
    for name in ("nvfp4", "averis"):
        assert abs(losses[name] - losses["bf16"]) <= 0.05 * abs(losses["bf16"])


