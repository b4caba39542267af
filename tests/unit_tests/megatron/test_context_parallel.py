"""Context parallelism (CP=2) of SDPACoreAttention and of a whole GPT built from the Averis spec.

Attention: on each CP rank, the output and the q/k/v gradients of its tokens equal a float64
softmax attention over the full sequence (single process, explicit GQA repetition and global
causal mask), sliced to that rank's tokens as megatron-core's get_batch_on_this_cp_rank cuts them.

Whole model (TP=1, FP32 params): CP=2 against CP=1 on the same tokens and weights.
- bf16 recipe: per-token losses within 1e-5 relative, linear-weight gradients summed over the two
  CP ranks within 1e-5 of their max (1e-4 on GPU) — only summation order changes.
- averis recipe: the Averis mean (and amax) stay local to each CP rank (docs/parallelism-cp.md), so
  the FP4 operands are not those of CP=1; the model is still the same function up to FP4 noise:
  per-token losses within 3e-2 relative of CP=1 (measured on CPU: 1.0e-2, while averis at CP=1 is
  itself 0.74e-2 from the FP32 model), and each weight gradient no further from the FP32 model's
  than 1.25x the CP=1 averis gradient's distance (relative Frobenius; measured ratios 0.93-1.03,
  the distances being ~0.3 on this 64-token toy batch).

megatron-core's sequence-parallel/TP mappings need CUDA, so the CPU tests keep TP=1.
"""

import pytest
import torch

from cp_cases import ATTN_CASES, attention_inputs, attention_worker, gpt_worker
from tp_harness import run_world

from megatron_averis.megatron.attention import SDPACoreAttention, zigzag_positions

CP = 2
RECIPES = ("bf16", "averis")
ATTN_TOL = {"cpu": 1e-5, "cuda": 1e-4}
LOSS_RTOL, GRAD_TOL = 1e-5, {"cpu": 1e-5, "cuda": 1e-4}
AVERIS_LOSS_RTOL, AVERIS_GRAD_RATIO = 3e-2, 1.25


def reference_attention(heads, groups, mask_type, with_mask):
    """float64 output and q/k/v gradients over the whole sequence, one process."""
    q, k, v, grad, mask = attention_inputs(heads, groups, with_mask)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    s, d = q.shape[0], q.shape[-1]
    rep = heads // groups
    kh = torch.stack([k[:, :, i // rep] for i in range(heads)], dim=2)
    vh = torch.stack([v[:, :, i // rep] for i in range(heads)], dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, kh) / d ** 0.5
    keep = torch.ones(s, s, dtype=torch.bool)
    if mask_type in ("causal", "padding_causal"):
        keep = torch.tensor([[j <= i for j in range(s)] for i in range(s)])
    if mask is not None:
        keep = keep & ~mask
    p = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,kbhd->qbhd", p, vh).reshape(s, q.shape[1], -1)
    out.backward(grad.double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def check_attention(results, device_type):
    tol = ATTN_TOL[device_type]
    for name, heads, groups, mask_type, with_mask in ATTN_CASES:
        ref = reference_attention(heads, groups, mask_type, with_mask)
        seen = torch.cat([r[name]["pos"] for r in results]).sort().values
        assert torch.equal(seen, torch.arange(seen.numel())), "CP ranks cover the sequence once"
        for rank, res in enumerate(results):
            pos = res[name]["pos"]
            # our zigzag positions are mcore's batch slicing
            assert torch.equal(zigzag_positions(pos.numel(), rank, len(results)), pos)
            for key in ("out", "dq", "dk", "dv"):
                torch.testing.assert_close(res[name][key].double(), ref[key][pos], rtol=tol,
                                           atol=tol, msg=lambda m: f"{name} rank {rank} {key}: {m}")


def _by_position(results, recipe, key):
    out = torch.empty_like(torch.cat([r[recipe][key] for r in results], dim=-1))
    for r in results:
        out[..., r[recipe]["pos"]] = r[recipe][key]
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_gpt(cp1, cp2, device_type):
    # bf16 recipe (FP32 params): the same function, summation order aside.
    bf16 = cp1["bf16"]
    torch.testing.assert_close(_by_position(cp2, "bf16", "loss"), bf16["loss"], rtol=LOSS_RTOL,
                               atol=0)
    for name, want in bf16["grads"].items():
        got = sum(r["bf16"]["grads"][name] for r in cp2)
        assert (got - want).abs().max() <= GRAD_TOL[device_type] * want.abs().max(), name
    # averis: CP-local means and amaxes; the same model up to FP4 noise.
    loss1, loss2 = cp1["averis"]["loss"], _by_position(cp2, "averis", "loss")
    loss_rel = ((loss2 - loss1).abs() / loss1.abs()).max().item()
    assert loss_rel <= AVERIS_LOSS_RTOL, loss_rel
    ratios = {}
    for name, fp32 in bf16["grads"].items():
        err1 = _rel(cp1["averis"]["grads"][name], fp32)
        err2 = _rel(sum(r["averis"]["grads"][name] for r in cp2), fp32)
        ratios[name] = err2 / err1
    assert max(ratios.values()) <= AVERIS_GRAD_RATIO, ratios
    print(f"averis CP=2 vs CP=1 ({device_type}): per-token loss max rel diff {loss_rel:.2e}; "
          f"gradient error vs FP32 model, CP=2 / CP=1: "
          f"{min(ratios.values()):.2f}-{max(ratios.values()):.2f}")


# ---- CPU / gloo --------------------------------------------------------------------------------

def test_cp_attention_matches_float64_full_sequence():
    check_attention(run_world(CP, attention_worker, "cpu"), "cpu")


@pytest.fixture(scope="module")
def gpt_runs_cpu():
    return run_world(1, gpt_worker, RECIPES, "cpu")[0], run_world(CP, gpt_worker, RECIPES, "cpu")


def test_gpt_cp2_matches_cp1(gpt_runs_cpu):
    check_gpt(*gpt_runs_cpu, "cpu")


# ---- errors (no process group needed) -----------------------------------------------------------

def test_sequence_not_divisible_by_two_cp_chunks_is_refused():
    with pytest.raises(ValueError, match=r"divisible by 2·context_parallel_size = 4"):
        zigzag_positions(7, 0, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(cp_comm_type="p2p"), "cp_comm_type=None or 'all_gather'"),
    (dict(attention_type="cross"), "self-attention only"),
])
def test_cp_modes_it_does_not_implement_are_refused(kwargs, match):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               use_cpu_initialization=True, context_parallel_size=2)
    kwargs = {"attention_type": "self", **kwargs}
    with pytest.raises(ValueError, match=match):
        SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, **kwargs)


# ---- GPU / NCCL --------------------------------------------------------------------------------

def _need_gpus():
    if torch.cuda.device_count() < CP:
        pytest.skip(f"needs {CP} GPUs")


@pytest.mark.gpu
def test_cp_attention_matches_float64_full_sequence_nccl():
    _need_gpus()
    check_attention(run_world(CP, attention_worker, "cuda", backend="nccl"), "cuda")


@pytest.mark.gpu
def test_gpt_cp2_matches_cp1_nccl():
    _need_gpus()
    cp1 = run_world(1, gpt_worker, RECIPES, "cuda", backend="nccl")[0]
    check_gpt(cp1, run_world(CP, gpt_worker, RECIPES, "cuda", backend="nccl"), "cuda")
