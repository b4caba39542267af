"""What the quantized linear keeps for backward: the packed FP4 payload of X's wgrad operand
(and W's dgrad operand), counted through torch.autograd.graph.saved_tensors_hooks against the
byte formula; gradients against a reference built from the numerics functions directly; the
same under TP=2 + sequence parallelism (gloo), including what travels and the BF16 fallback."""

import pytest
import torch

from megatron_averis.linear import QuantizedLinear
from megatron_averis.linear.comm import SINGLE_DEVICE
from megatron_averis.linear.saved import RunningModule, SavedBytes
from megatron_averis.numerics import quantize_operand, qgemm, random_signs
from megatron_averis.numerics.random import mix_seed
from megatron_averis.recipes import OPERAND_ROLES, get_recipe
from tp_cases import K, N, reference_slices, run_linear, saved_bytes_worker
from tp_harness import run_world

FP4_RECIPES = ["nvfp4", "nvfp4-nohadamard", "averis", "averis-rht", "averis-paper"]
STREAM = 3


def _payload(rows, cols, block, scale_bytes=1):
    """Packed FP4 [rows, cols] blocked along cols: codes 2 per byte, one scale per block of
    `block` elements, the FP32 tensor scale."""
    return rows * cols // 2 + rows * cols // block * scale_bytes + 4


def expected_saved_bytes(name, t, k, n):
    """Bytes backward keeps for x [t, k] and weight [n, k] (this rank's parts), by recipe."""
    if name == "bf16":
        return 2 * t * k  # X itself
    if name == "averis-paper":  # X̂ and Ŵ along features (1x16), μ in FP32
        return _payload(t, k, 16) + 4 * k + _payload(n, k, 16)
    if name == "nvfp4-plain":  # Xᵀ and Wᵀ, 1x16 along tokens / out-features
        return _payload(k, t, 16) + _payload(k, n, 16)
    if name == "mxfp4":  # 1x32 E8M0 scales
        return _payload(k, t, 32) + _payload(k, n, 32)
    mean = 2 * k if name.startswith("averis") else 0  # μ̂ of Xᵀ in BF16
    return _payload(k, t, 16) + mean + _payload(k, n, 256)  # Wᵀ: 16x16 blocks


def _data(t, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, k, generator=g) + 3 * torch.randn(k, generator=g)).bfloat16()
    gy = ((torch.randn(t, n, generator=g) - 2 * torch.randn(n, generator=g)) * 0.1).bfloat16()
    return x, gy


@pytest.mark.parametrize("name", ["bf16", "nvfp4-plain", "mxfp4"] + FP4_RECIPES)
@pytest.mark.parametrize("t", [64, 128])
def test_saved_bytes_match_the_formula(name, t):
    k, n = 64, 96
    lin = QuantizedLinear(k, n, recipe=name, stream_id=STREAM)
    x, _ = _data(t, k, n)
    x = x.view(2, t // 2, k).requires_grad_()
    with SavedBytes(exclude=list(lin.parameters())) as saved:
        y = lin(x)
    assert saved.total == expected_saved_bytes(name, t, k, n), (name, saved.total, saved.by_dtype)
    if name != "bf16":  # what is BF16 is at most a mean vector, never X
        assert saved.by_dtype.get(torch.bfloat16, 0) <= 2 * k
        assert saved.total < 0.3 * 2 * t * k + _payload(n, k, 16) + 4 * k
    y.sum().backward()  # the saved payload is enough for backward


def _reference_operands(recipe, x, w, gy, call):
    """Every GEMM operand built with numerics.quantize_operand straight from the recipe's
    fields: X and G quantized along tokens for wgrad, seeds mixed as the documented stream
    (recipe seed, layer, call, role, replica)."""
    signs = {gemm: random_signs(recipe.rht_seed) for gemm in ("fprop", "dgrad", "wgrad")
             if recipe.rht(gemm)}

    def q(role, src, mean_dim, transposed=False):
        o = recipe.operand(role)
        seed = (mix_seed(recipe.sr_seed, STREAM, call, OPERAND_ROLES.index(role), 0)
                if o.rounding == "stochastic" else None)
        return quantize_operand(src, o.format, block=o.block, rounding=o.rounding,
                                mean_dim=mean_dim if o.mean_split else None,
                                mean_format=o.mean_format, signs=signs.get(role.split("_")[0]),
                                sr_seed=seed, transposed=transposed)

    if recipe.quantize_once:  # each tensor once, along features; read transposed by dgrad/wgrad
        x_hat, g_hat = q("fprop_input", x, 0), q("dgrad_grad", gy, 0)
        w_hat = q("fprop_weight", w, None)
        return g_hat, w_hat.reoriented(), g_hat.reoriented(), x_hat.reoriented()
    return (q("dgrad_grad", gy, 0), q("dgrad_weight", w.t(), None, True),
            q("wgrad_grad", gy.t(), 1, True), q("wgrad_input", x.t(), 1, True))


def _float64_product(a, b, cross_terms):
    """A·Bᵀ of two operands in float64 from their dequantized parts: with both means along the
    reduction dimension and no cross terms, R̂_A·R̂_Bᵀ + K·μ_A·μ_Bᵀ (the Averis restoration)."""
    if a.mean_dim == 1 and b.mean_dim == 1 and not cross_terms:
        ra = a.qt.dequantize() if a.qt is not None else a.bf16.double() * a.scale().double()
        rb = b.qt.dequantize() if b.qt is not None else b.bf16.double() * b.scale().double()
        return ra @ rb.T + a.shape[1] * torch.outer(a.mean_fp32().double(), b.mean_fp32().double())
    return a.dequantize(unrotate=False) @ b.dequantize(unrotate=False).T


@pytest.mark.parametrize("name", FP4_RECIPES)
def test_gradients_equal_the_numerics_reference(name):
    """dX and dW bit for bit equal to the GEMMs of the reference operands (two calls: the
    stochastic-rounding stream moves on), and within FP32 accumulation of float64 products."""
    t, k, n = 64, 64, 96
    recipe = get_recipe(name)
    lin = QuantizedLinear(k, n, bias=False, recipe=recipe, stream_id=STREAM)
    x, gy = _data(t, k, n, seed=1)
    w = lin.weight.detach()
    once = recipe.quantize_once
    for call in (1, 2):
        xi = x.clone().requires_grad_()
        lin.weight.grad = None
        lin(xi).backward(gy)
        g_d, w_d, g_w, x_w = _reference_operands(recipe, x, w, gy, call)
        dx_ref = qgemm(g_d, w_d, out_dtype=torch.bfloat16)
        dw_ref = qgemm(g_w, x_w, cross_terms=once)
        assert torch.equal(xi.grad, dx_ref), (name, call)
        assert torch.equal(lin.weight.grad, dw_ref.to(torch.bfloat16)), (name, call)
        for got, want in ((qgemm(g_d, w_d).double(), _float64_product(g_d, w_d, once)),
                          (dw_ref.double(), _float64_product(g_w, x_w, once))):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name


# ---- TP=2 + sequence parallelism (gloo) ------------------------------------------------------
T, T_FALLBACK, WORLD = 64, 48, 2  # 48 tokens: 24 per rank, not a multiple of the 16-token block
TP_CASES = ([(r, m, T) for r in FP4_RECIPES for m in ("column", "row")]
            + [("bf16", "column", T), ("averis", "column", T_FALLBACK),
               ("averis", "row", T_FALLBACK)])
OUT_TOL = 2e-5  # as test_tp_equivalence: split-K partial sums add in another order


def _local_dims(mode, t):
    """(tokens, in-features, out-features) of a rank's x and weight."""
    return (t // WORLD, K, N // WORLD) if mode == "column" else (t, K // WORLD, N)


@pytest.fixture(scope="module")
def tp_results():
    return run_world(WORLD, saved_bytes_worker, TP_CASES)


@pytest.mark.parametrize("case", TP_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_tp_sp_saves_the_local_payload_and_matches_one_device(tp_results, case):
    name, mode, t = case
    ref = run_linear(name, "none", SINGLE_DEVICE, lambda *v: v, torch.device("cpu"), t=t)
    tl, kl, nl = _local_dims(mode, t)
    fallback = t == T_FALLBACK
    for rank, results in enumerate(tp_results):
        got = results[case]
        # A column-parallel rank keeps its token shard (gathered in backward); the fallback
        # gathers BF16 X in forward and keeps the payload of all tokens.
        want = expected_saved_bytes(name, t if fallback else tl, kl, nl)
        if name == "bf16":  # BF16 operands of FP32 test tensors: W's BF16 copy is saved too
            want += 2 * nl * kl
        assert got["saved_bytes"] == want, (case, rank, got["saved_bytes"], want)
        sl = reference_slices(mode, rank, WORLD, t)
        for key in ("y", "dx", "dw") if name != "bf16" else ():  # one device: F.linear in FP32
            w = ref[key][sl[key]]
            assert (got[key] - w).abs().max() <= OUT_TOL * w.abs().max(), (case, rank, key)
        assert any("not a multiple of the 16-token wgrad block" in m
                   for m in got["warnings"]) == fallback
        gathered = (got["gathered_forward"], got["gathered_backward"])
        if mode == "row":  # backward gathers G's shard [t / 2, N]: its payload(s), or FP32 G
            tg = t // WORLD
            payloads = 1 if name == "averis-paper" else 2  # G (and Gᵀ)
            assert gathered == (0, 4 * tg * N if fallback else payloads * tg * N * 9 // 16), case
        elif fallback:  # X (FP32 here) all-gathered in forward, nothing in backward
            assert gathered == (4 * tl * K, 0)
        elif name == "bf16":
            assert gathered == (2 * tl * K, 2 * tl * K)
        else:  # X's packed payload (codes + E4M3 scales), 9/32 of its BF16 bytes, both ways
            assert gathered == (tl * K * 9 // 16, tl * K * 9 // 16), (case, rank, gathered)


def test_saved_bytes_split_by_running_module():
    """Each saved storage is charged to the innermost module running when it was first saved;
    the sizes are those of the tensors the ops are known to save (FP32, 4 bytes)."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh())
    x = torch.randn(3, 8, requires_grad=True)
    with RunningModule() as running, SavedBytes(exclude=list(net.parameters()),
                                                label=running.name) as saved:
        y = net(x) * 2.0
        (y * y).sum()
    assert saved.by_label == {"Linear": 3 * 8 * 4,  # addmm keeps its input
                              "Tanh": 3 * 4 * 4,  # tanh keeps its output
                              RunningModule.OUTSIDE: 3 * 4 * 4}  # y * y keeps y (one storage)
    assert saved.total == sum(saved.by_label.values())
    # The global hooks are gone after the block: nothing is charged to a module any more.
    with SavedBytes(label=running.name) as after:
        net(x)
    assert set(after.by_label) == {RunningModule.OUTSIDE}
