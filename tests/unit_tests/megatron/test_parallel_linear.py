"""AverisColumnParallelLinear / AverisRowParallelLinear on one process: the parent's contract,
the recipe path, and Megatron DDP's main_grad with gradient-accumulation fusion."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_averis.linear import QuantizedLinear
from megatron_averis.megatron.parallel_linear import AverisColumnParallelLinear, AverisRowParallelLinear
from megatron_averis.recipes import RecipeError, get_recipe


def _config(**kw):
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                             use_cpu_initialization=True, **{"params_dtype": torch.float32, **kw})


def _init():
    return lambda w: torch.nn.init.normal_(w, std=0.05)


def _layers(recipe, **kw):
    col = AverisColumnParallelLinear(64, 96, config=_config(**kw), init_method=_init(), bias=False,
                                     recipe=recipe)
    row = AverisRowParallelLinear(96, 64, config=_config(**kw), init_method=_init(), bias=False,
                                  input_is_parallel=True, skip_bias_add=True, recipe=recipe)
    return col, row


def test_bf16_recipe_is_the_parent(mcore_single_process):
    torch.manual_seed(0)
    col, row = _layers(get_recipe("bf16"))
    torch.manual_seed(0)
    pcol = ColumnParallelLinear(64, 96, config=_config(), init_method=_init(), bias=False)
    prow = RowParallelLinear(96, 64, config=_config(), init_method=_init(), bias=False,
                             input_is_parallel=True, skip_bias_add=True)
    assert torch.equal(col.weight, pcol.weight) and torch.equal(row.weight, prow.weight)
    x = torch.randn(16, 2, 64)
    assert torch.equal(row(col(x)[0])[0], prow(pcol(x)[0])[0])
    assert col.linear_ctx is None and row.linear_ctx is None


@pytest.mark.parametrize("recipe", ["averis", "nvfp4", "mxfp4", "averis-paper"])
def test_fp4_layers_match_the_single_device_linear(mcore_single_process, recipe):
    """Same weights, same stream id → the same result as QuantizedLinear (mode 'none')."""
    torch.manual_seed(0)
    col, row = _layers(get_recipe(recipe))
    x = torch.randn(16, 2, 64) + 2.0
    for layer, k, n in ((col, 64, 96), (row, 96, 64)):
        ref = QuantizedLinear(k, n, bias=False, recipe=recipe, dtype=torch.float32,
                              stream_id=layer.linear_ctx.stream_id)
        with torch.no_grad():
            ref.weight.copy_(layer.weight)
        inp = x if layer is col else torch.randn(16, 2, 96)
        a, b = inp.clone().requires_grad_(), inp.clone().requires_grad_()
        out = layer(a)[0]
        want = ref(b)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        g = torch.randn_like(out)
        out.backward(g)
        want.backward(g)
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=0, atol=0)


def test_main_grad_accumulation_for_megatron_ddp(mcore_single_process):
    """gradient_accumulation_fusion: dW is added into weight.main_grad (FP32) over micro-batches,
    Megatron DDP's dummy-grad protocol is followed, and no apex kernel is needed."""
    recipe = get_recipe("averis")
    torch.manual_seed(0)
    col, _ = _layers(recipe, gradient_accumulation_fusion=True)
    torch.manual_seed(0)
    plain, _ = _layers(recipe)
    assert col.gradient_accumulation_fusion and col.linear_ctx.accumulate_main_grad
    col.weight.main_grad = torch.zeros_like(col.weight, dtype=torch.float32)
    col.weight.grad_added_to_main_grad = False
    plain.linear_ctx.stream_id = col.linear_ctx.stream_id
    xs = [torch.randn(16, 2, 64) + 1.0 for _ in range(3)]
    for x in xs:
        col(x)[0].square().sum().backward()
        plain(x)[0].square().sum().backward()
    assert col.weight.grad_added_to_main_grad
    torch.testing.assert_close(col.weight.main_grad, plain.weight.grad, rtol=1e-6, atol=1e-6)


def test_fp4_layers_keep_dw_in_fp32_under_ddp_whatever_the_flag(mcore_single_process):
    """The trainer passes gradient_accumulation_fusion=False (megatron-core's BF16 layers would
    need apex for it). FP4 layers still add their FP32 dW into main_grad when DDP gives one: with
    BF16 weights, main_grad keeps bits that a BF16 gradient would round away. Without main_grad,
    dW comes back as the weight's grad, that FP32 dW rounded once to BF16."""
    recipe = get_recipe("averis")
    col, twin = [AverisColumnParallelLinear(64, 96, config=_config(params_dtype=torch.bfloat16),
                                            init_method=_init(), bias=False, recipe=recipe)
                 for _ in range(2)]
    twin.weight.data.copy_(col.weight.data)
    assert not col.gradient_accumulation_fusion and col.linear_ctx.accumulate_main_grad
    twin.linear_ctx.stream_id = col.linear_ctx.stream_id
    col.weight.main_grad = torch.zeros_like(col.weight, dtype=torch.float32)
    col.weight.grad_added_to_main_grad = False
    x = torch.randn(16, 2, 64, dtype=torch.bfloat16) + 1.0
    col(x)[0].float().square().sum().backward()
    twin(x)[0].float().square().sum().backward()
    assert col.weight.grad_added_to_main_grad and twin.weight.grad.dtype == torch.bfloat16
    dw = col.weight.main_grad
    assert torch.equal(dw.to(torch.bfloat16), twin.weight.grad)
    assert not torch.equal(dw, dw.to(torch.bfloat16).float())  # FP32 bits kept


def test_shape_errors_at_build(mcore_single_process):
    with pytest.raises(RecipeError, match="in_features=40"):
        AverisColumnParallelLinear(40, 64, config=_config(), init_method=_init(), bias=False,
                                   recipe=get_recipe("averis"))
    with pytest.raises(RecipeError, match="out_features=24"):
        AverisRowParallelLinear(64, 24, config=_config(), init_method=_init(), bias=False,
                                input_is_parallel=True, skip_bias_add=True, recipe=get_recipe("averis"))
