import dataclasses

import pytest

from megatron_averis.recipes import (
    OPERAND_ROLES,
    PRESETS,
    RecipeError,
    check_linear_shape,
    check_token_count,
    get_recipe,
)

ACT = ("fprop_input", "wgrad_input")
GRAD = ("dgrad_grad", "wgrad_grad")
W = ("fprop_weight", "dgrad_weight")


def _ops(r):
    return {role: r.operand(role) for role in OPERAND_ROLES}


def test_bf16_and_vanilla_presets():
    assert get_recipe("bf16").is_bf16
    for name, fmt, k in (("nvfp4-plain", "nvfp4", 16), ("mxfp4", "mxfp4", 32)):
        r = get_recipe(name)
        for o in _ops(r).values():
            assert (o.format, o.block, o.rounding, o.mean_split) == (fmt, (1, k), "rne", False)
        assert not (r.fprop_rht or r.dgrad_rht or r.wgrad_rht)


def test_nvidia_recipe():
    """NVIDIA, 'Pretraining LLMs with NVFP4': 16x16 weight blocks, SR on gradients, RHT on the
    wgrad inputs only, RNE elsewhere."""
    r = get_recipe("nvfp4")
    for role in W:
        assert r.operand(role).block == (16, 16) and r.operand(role).rounding == "rne"
    for role in GRAD:
        assert r.operand(role).rounding == "stochastic" and r.operand(role).block == (1, 16)
    for role in ACT:
        assert r.operand(role).rounding == "rne"
    assert (r.fprop_rht, r.dgrad_rht, r.wgrad_rht) == (False, False, True)
    assert not any(o.mean_split for o in _ops(r).values())
    assert r.shares_weight_quantization


@pytest.mark.parametrize("name,rht", [("averis", False), ("averis-rht", True)])
def test_averis_recipes(name, rht):
    r, base = get_recipe(name), get_recipe("nvfp4")
    for role in OPERAND_ROLES:
        o, b = r.operand(role), base.operand(role)
        assert (o.format, o.block, o.rounding) == (b.format, b.block, b.rounding)
        assert o.mean_split == (role not in W)
        assert o.mean_format == "bf16"
    assert r.wgrad_rht == rht and not r.fprop_rht and not r.dgrad_rht


def test_overrides_each_knob():
    r = get_recipe("averis", ["grads.mean_split=false", "wgrad_rht=on", "fprop_input.mean_format=nvfp4",
                              "dgrad_grad.rounding=rne", "bf16_first_layers=2", "rht_seed=9"])
    assert not r.dgrad_grad.mean_split and not r.wgrad_grad.mean_split and r.fprop_input.mean_split
    assert r.wgrad_rht and r.fprop_input.mean_format == "nvfp4" and r.dgrad_grad.rounding == "rne"
    assert (r.bf16_first_layers, r.rht_seed) == (2, 9)
    assert get_recipe("averis").dgrad_grad.rounding == "stochastic"  # presets are not mutated


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["fprop_input.block_2d=true"], "2-D blocks are for weights"),
        (["fprop_weight.mean_split=true"], "weights do not have"),
        (["wgrad_input.format=bf16"], "wgrad_rht needs both"),
        (["fprop_weight.format=mxfp4"], "16x16 blocks exist only for nvfp4"),
        (["dgrad_grad.rounding=up"], "rounding='up' is unknown"),
        (["fprop_input.mean_format=fp8"], "mean_format='fp8' is unknown"),
        (["fprop_input.format=int4"], "format='int4' is unknown"),
        (["nonsense=1"], "unknown recipe override key"),
        (["fprop_input.colour=red"], "unknown recipe override key"),
        (["wgrad_rht=maybe"], "expected true/false"),
        (["wgrad_rht"], "key=value"),
    ],
)
def test_invalid_combinations_are_named(overrides, match):
    with pytest.raises(RecipeError, match=match):
        get_recipe("nvfp4", overrides)


def test_bf16_operand_rejects_fp4_options():
    with pytest.raises(RecipeError, match="is bf16"):
        get_recipe("bf16", ["fprop_input.mean_split=true"])
    with pytest.raises(RecipeError, match="unknown recipe"):
        get_recipe("fp3")
    assert sorted(PRESETS) == sorted(["bf16", "nvfp4", "nvfp4-nohadamard", "nvfp4-plain", "averis", "averis-rht", "averis-paper", "mxfp4"])


def test_shape_checks():
    check_linear_shape(get_recipe("averis"), 1024, 3072)
    with pytest.raises(RecipeError, match="in_features=1000 .* multiple of 16"):
        check_linear_shape(get_recipe("averis"), 1000, 3072)
    with pytest.raises(RecipeError, match="out_features=48 .* multiple of 32"):
        check_linear_shape(get_recipe("mxfp4"), 64, 48)
    check_linear_shape(get_recipe("bf16"), 1000, 3)
    check_token_count(get_recipe("averis"), 4096)
    with pytest.raises(RecipeError, match="100 tokens .* multiple of 16"):
        check_token_count(get_recipe("averis"), 100)


def test_nohadamard_control_is_nvidia_recipe_without_rht():
    r, nv = get_recipe("nvfp4-nohadamard"), get_recipe("nvfp4")
    assert [r.operand(x) for x in OPERAND_ROLES] == [nv.operand(x) for x in OPERAND_ROLES]
    assert (r.wgrad_rht, nv.wgrad_rht) == (False, True)
    split = get_recipe("averis")
    assert [dataclasses.replace(split.operand(x), mean_split=False) for x in OPERAND_ROLES] == \
        [r.operand(x) for x in OPERAND_ROLES]


def test_deprecated_name_resolves_with_a_warning():
    with pytest.warns(FutureWarning, match="'nvfp4-rht' is deprecated and now called 'nvfp4'"):
        r = get_recipe("nvfp4-rht")
    assert r == get_recipe("nvfp4")


def test_averis_paper_recipe():
    """The authors' numerics: 1x16 blocks everywhere, RNE for X and W, SR for G, μ in FP32, each
    tensor quantized once, no RHT."""
    r = get_recipe("averis-paper")
    assert r.quantize_once and not any(r.rht(g) for g in ("fprop", "dgrad", "wgrad"))
    for role in OPERAND_ROLES:
        o = r.operand(role)
        assert (o.format, o.block) == ("nvfp4", (1, 16))
        assert o.rounding == ("stochastic" if role in GRAD else "rne")
        assert o.mean_split == (role not in W) and (o.mean_format == "fp32" or role in W)


@pytest.mark.parametrize("overrides,match", [
    (["wgrad_grad.rounding=rne"], "dgrad_grad and wgrad_grad must be equal"),
    (["dgrad_weight.block_2d=true"], "fprop_weight and dgrad_weight must be equal"),
    (["inputs.mean_split=false", "wgrad_rht=true"], "no GEMM can be rotated"),
])
def test_quantize_once_needs_one_recipe_per_tensor(overrides, match):
    with pytest.raises(RecipeError, match=match):
        get_recipe("averis-paper", overrides)
