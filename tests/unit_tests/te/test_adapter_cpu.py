"""The TE adapter without Transformer Engine: role mapping, presets, the TE-missing error, the
trainer flag, and the adapter's numerics against QuantizedLinear (bit for bit on the CPU)."""

from dataclasses import dataclass

import pytest
import torch

from megatron_averis.linear import QuantizedLinear
from megatron_averis.linear.function import LinearContext
from megatron_averis.linear.operands import OperandPair, quantize_tensor
from megatron_averis.recipes import RecipeError, get_recipe
from megatron_averis.te import core, factories, native
from megatron_averis.te.availability import TransformerEngineMissing, require_te, te_installed
from megatron_averis.te.model import (FACTORY_PATH, TE_NVFP4_REFERENCE, config_runs_te_nvfp4,
                                      te_config_fields)
from megatron_averis.te.roles import slot_spec

ROLES = ("fprop_input", "wgrad_input", "dgrad_grad", "wgrad_grad", "fprop_weight", "dgrad_weight")


@dataclass(frozen=True)
class Role:
    """Stand-in with the fields of TE's QuantizerRole (module_type, tensor_type, name)."""

    module_type: str = ""
    tensor_type: str = ""
    name: str = ""


@pytest.mark.parametrize("tensor_type,operands", [
    ("input", ("fprop_input", "wgrad_input")),
    ("weight", ("fprop_weight", "dgrad_weight")),
    ("grad_output", ("dgrad_grad", "wgrad_grad")),
])
def test_linear_roles_map_to_gemm_operands(tensor_type, operands):
    spec = slot_spec(Role("linear", tensor_type, "qkv"))
    assert spec.kind == tensor_type and spec.operand_roles == operands and spec.name == "qkv"


@pytest.mark.parametrize("role", [None, Role(), Role("linear", "output"), Role("linear", "grad_input"),
                                  Role("dpa", "qkv"), Role("dpa", "s")])
def test_other_slots_stay_high_precision(role):
    assert slot_spec(role).kind is None and slot_spec(role).operand_roles is None


def test_grouped_linear_refused():
    with pytest.raises(ValueError, match="grouped"):
        slot_spec(Role("grouped_linear", "input"))


@pytest.mark.parametrize("name", factories.TE_PRESETS)
def test_preset_factories_are_the_recipe_presets(name):
    f = factories.PRESET_FACTORIES[name]
    assert f.recipe == get_recipe(name)
    assert getattr(factories, name.replace("-", "_")) is f


@pytest.mark.skipif(te_installed(), reason="Transformer Engine is installed")
def test_missing_te_error_names_the_fix():
    with pytest.raises(TransformerEngineMissing, match="--transformer-impl local") as e:
        require_te()
    assert "Transformer Engine" in str(e.value) and "not installed" in str(e.value)
    with pytest.raises(TransformerEngineMissing):
        factories.averis(Role("linear", "input"))


def test_configured_factory_needs_a_recipe():
    c = factories._Configured()
    with pytest.raises(RuntimeError, match="configure"):
        c(Role("linear", "input"))
    r = get_recipe("averis", ["grads.rounding=rne"])
    c.configure(r)
    assert c.factory.recipe == r


@pytest.mark.parametrize("name, overrides, fp4_tensor_cores, expected", [
    ("nvfp4", ["fp4_gemm=auto"], True, "nvfp4"),
    ("nvfp4", ["fp4_gemm=native", "bf16_first_layers=1", "sr_seed=9"], True, "nvfp4"),
    ("nvfp4-rht", ["fp4_gemm=auto"], True, "nvfp4"),  # the deprecated alias is the same recipe
    ("nvfp4", [], True, "custom"),  # fp4_gemm=dequant: emulated, as asked
    ("nvfp4", ["fp4_gemm=auto"], False, "custom"),  # Hopper: no FP4 tensor cores
    ("nvfp4", ["fp4_gemm=auto", "wgrad_rht=false"], True, "custom"),  # not NVIDIA's recipe
    ("nvfp4-nohadamard", ["fp4_gemm=auto"], True, "custom"),
    ("averis", ["fp4_gemm=auto"], True, "custom"),  # residual GEMMs native inside (native.py)
])
def test_blackwell_dispatch(monkeypatch, name, overrides, fp4_tensor_cores, expected):
    monkeypatch.setattr(native, "hardware_fp4", lambda device: fp4_tensor_cores)
    recipe = get_recipe(name, overrides)
    fields = te_config_fields(recipe, "cuda:0")
    assert fields["fp4_recipe"] == expected
    assert ("fp4_quantizer_factory" in fields) == (expected == "custom")
    assert ("num_layers_at_start_in_bf16" in fields) == (recipe.bf16_first_layers > 0)
    assert te_config_fields(recipe)["fp4_recipe"] == "custom"  # no device given: ours
    ref = te_config_fields(recipe, "cuda:0", te_nvfp4_backend="reference")
    if expected == "nvfp4":  # TE's Python reference of NVFP4BlockScaling in the same slot
        assert (ref["fp4_recipe"], ref["fp4_quantizer_factory"]) == ("custom", TE_NVFP4_REFERENCE)
    else:
        assert ref == fields
    with pytest.raises(ValueError, match="te_nvfp4_backend='hardware'"):
        te_config_fields(recipe, "cuda:0", te_nvfp4_backend="hardware")


def test_te_config_fields_select_the_configured_factory():
    from megatron.core.fp8_utils import _resolve_callable_from_python_import_path
    from megatron.core.transformer.transformer_config import TransformerConfig

    assert te_config_fields(get_recipe("bf16")) == {}
    fields = te_config_fields(get_recipe("averis", ["bf16_first_layers=1", "bf16_last_layers=1"]))
    assert fields["fp4_recipe"] == "custom" and fields["fp4_quantizer_factory"] == FACTORY_PATH
    assert (fields["num_layers_at_start_in_bf16"], fields["num_layers_at_end_in_bf16"]) == (1, 1)
    cfg = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                            use_cpu_initialization=True, **fields)
    assert cfg.fp4 == "e2m1" and cfg.first_last_layers_bf16
    # megatron-core resolves --fp4-quantizer-factory strings like this:
    assert _resolve_callable_from_python_import_path(FACTORY_PATH) is factories.configured
    assert _resolve_callable_from_python_import_path(
        "megatron_averis.te.factories.averis_rht") is factories.averis_rht


def test_transformer_impl_flag(tmp_path):
    from megatron_averis.training.arguments import ConfigError, finalize_args, parse_args

    (tmp_path / "tok.model").write_bytes(b"")
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--train-iters", "2", "--lr", "1e-3", "--eval-iters", "0",
            "--tokenizer-model", str(tmp_path / "tok.model"), "--train-data-path", "x"]
    assert parse_args(base).transformer_impl is None  # finalize_args resolves it (test_megatron_flags)
    with pytest.raises(SystemExit):
        parse_args(base + ["--transformer-impl", "te"])
    if torch.cuda.is_available() and te_installed():
        pytest.skip("CUDA and Transformer Engine present: the refusal cannot be provoked")
    with pytest.raises(ConfigError) as e:
        finalize_args(parse_args(base + ["--transformer-impl", "transformer_engine",
                                         "--fp4-recipe", "averis"]), 1)
    msg = "\n".join(e.value.problems)
    assert "--transformer-impl transformer_engine" in msg and "--transformer-impl local" in msg
    with pytest.raises(ConfigError) as e:  # the FP4 tensor cores are reached only through TE
        finalize_args(parse_args(base + ["--fp4-recipe", "averis", "--fp4-gemm", "native"]), 1)
    assert any("--fp4-gemm native runs only on the Transformer Engine route" in p
               for p in e.value.problems)


def test_native_gemm_follows_the_recipe_field():
    with pytest.raises(RecipeError, match="fp4_gemm='fast' is unknown"):
        get_recipe("nvfp4-plain", ["fp4_gemm=fast"])
    op = quantize_tensor(LinearContext(recipe=get_recipe("nvfp4-plain")), "input", torch.randn(32, 64),
                       rowwise=True, columnwise=False, row_call=1, col_call=1).rowwise
    for emulated in ("auto", "dequant", "fused"):  # CPU: auto falls back to the emulation
        assert native.product_for(op, op, emulated) is None
    with pytest.raises(RuntimeError, match="sm_100"):
        native.product_for(op, op, "native")


def _te_call_pattern(recipe, stream, x, weight, g, call, split_input: bool):
    """The per-role quantizer's operands and core's GEMMs in the order TE's Linear asks for them. split_input: the
    input's usages in two calls (TE's column-parallel sequence-parallel pattern)."""
    ctx = LinearContext(recipe=recipe, stream_id=stream)
    q = dict(row_call=call, col_call=call)
    if split_input:
        row = quantize_tensor(ctx, "input", x, rowwise=True, columnwise=False, **q).rowwise
        col = quantize_tensor(ctx, "input", x, rowwise=False, columnwise=True, **q).columnwise
        xp = OperandPair(row, col)
    else:
        xp = quantize_tensor(ctx, "input", x, rowwise=True, columnwise=True, **q)
    wp = quantize_tensor(ctx, "weight", weight, rowwise=True, columnwise=True, **q)
    gp = quantize_tensor(ctx, "grad_output", g, rowwise=True, columnwise=True, **q)
    outs = (core.gemm("fprop", xp, wp, torch.bfloat16), core.gemm("dgrad", gp, wp, torch.bfloat16),
            core.gemm("wgrad", gp, xp, torch.bfloat16))
    ops = dict(zip(ROLES, (xp.rowwise, xp.columnwise, gp.rowwise, gp.columnwise, wp.rowwise,
                           wp.columnwise)))
    return outs, ops


@pytest.mark.parametrize("name", ["averis", "averis-rht", "nvfp4-plain", "nvfp4-nohadamard", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("split_input", [False, True])
def test_adapter_numerics_match_quantized_linear(name, split_input):
    """Same operands (codes, scales, means) and the same Y, dX, dW as QuantizedLinear, two
    steps (call counters -> stochastic-rounding seeds), with mean-biased data."""
    torch.manual_seed(0)
    t, k, n = 64, 64, 96
    recipe = get_recipe(name)
    lin = QuantizedLinear(k, n, bias=False, recipe=recipe, stream_id=5)
    seen = {}
    lin.ctx.observer = lambda role, op: seen.__setitem__(role, op)
    x = (torch.randn(t, k) + 3.0).bfloat16().requires_grad_()
    g = (torch.randn(t, n) - 2.0).bfloat16()
    for call in (1, 2):
        x.grad, lin.weight.grad = None, None
        y = lin(x)
        y.backward(g)
        outs, ops = _te_call_pattern(recipe, 5, x.detach(), lin.weight.detach(), g, call,
                                     split_input)
        for role in ROLES:
            assert torch.equal(ops[role].dequantize(), seen[role].dequantize()), role
        for got, want in zip(outs, (y, x.grad, lin.weight.grad)):
            assert torch.equal(got, want)


def test_quantize_once_recipes_are_refused_by_the_te_route():
    from megatron_averis.recipes import RecipeError

    with pytest.raises(RecipeError, match="--transformer-impl local"):
        factories.QFactory("averis-paper")


@pytest.mark.parametrize("name, overrides, backend, expected", [
    ("bf16", [], "native", False),  # megatron-core's fp4_recipe default is "nvfp4", fp4 unset
    ("averis", [], "native", False),
    ("nvfp4", ["fp4_gemm=auto"], "native", True),
    ("nvfp4", ["fp4_gemm=auto"], "reference", True),
])
def test_config_runs_te_nvfp4_reads_real_configs(monkeypatch, name, overrides, backend, expected):
    """A real TransformerConfig built from the fields (found on the H200: BF16 configs carry
    fp4_recipe="nvfp4" by default and were taken for TE's NVFP4 route)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    monkeypatch.setattr(native, "hardware_fp4", lambda device: True)
    fields = te_config_fields(get_recipe(name, overrides), "cuda:0", te_nvfp4_backend=backend)
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            use_cpu_initialization=True, **fields)
    assert config_runs_te_nvfp4(cfg) is expected
