"""SDPACoreAttention against a float64 softmax(q·kᵀ·scale + mask)·v with explicit GQA repetition."""

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_averis.megatron.attention import SDPACoreAttention


def make_config(heads=4, groups=2, head_dim=8, dropout=0.0, **kw):
    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim, attention_dropout=dropout,
                             use_cpu_initialization=True, **kw)


def make_attention(config, mask_type=AttnMaskType.causal, **kw):
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=mask_type, attention_type="self", **kw)


def reference(q, k, v, scale, keep):
    """float64; q [sq, b, h, d], k/v [sk, b, g, d]; keep [sq, sk] or [b, 1, sq, sk] bool or None."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    # query head i belongs to key/value group i // rep
    k = torch.stack([k[:, :, i // rep] for i in range(q.shape[2])], dim=2)
    v = torch.stack([v[:, :, i // rep] for i in range(q.shape[2])], dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,kbhd->qbhd", p, v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def causal(sq, sk, shift=0):
    return torch.tensor([[j <= i + shift for j in range(sk)] for i in range(sq)])


def qkv(sq=6, sk=None, b=2, heads=4, groups=2, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sk = sq if sk is None else sk
    return (torch.randn(sq, b, heads, d, generator=g, dtype=dtype),
            torch.randn(sk, b, groups, d, generator=g, dtype=dtype),
            torch.randn(sk, b, groups, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_causal_gqa_forward_and_backward_match_float64(heads, groups):
    q, k, v = (t.requires_grad_() for t in qkv(heads=heads, groups=groups))
    attn = make_attention(make_config(heads, groups))
    out = attn(q, k, v, None)
    assert out.shape == (6, 2, heads * 8)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_inputs, 1 / math.sqrt(8), causal(6, 6))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for t, r in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


def test_softmax_scale_is_respected():
    q, k, v = qkv()
    out = make_attention(make_config(), softmax_scale=0.3)(q, k, v, None)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.3, causal(6, 6)), rtol=1e-5, atol=1e-5)


def test_padding_mask_true_means_masked_and_fully_masked_rows_stay_finite():
    q, k, v = qkv(sq=5)
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    mask[0, :, :, 3:] = True  # batch 0: keys 3, 4 are padding
    mask[1, :, 2, :] = True  # batch 1: query 2 may see nothing
    out = make_attention(make_config(), AttnMaskType.padding)(q, k, v, mask)
    assert torch.isfinite(out).all()
    ref = reference(q, k, v, 1 / math.sqrt(8), ~mask)
    rows = torch.ones(5, 2, dtype=torch.bool)
    rows[2, 1] = False
    torch.testing.assert_close(out.double()[rows], ref[rows], rtol=1e-5, atol=1e-5)


def test_causal_mask_type_combines_with_a_given_mask():
    q, k, v = qkv(sq=6)
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[:, :, 4:, :2] = True  # e.g. a document boundary: queries 4, 5 do not see keys 0, 1
    for mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal):
        out = make_attention(make_config(), mask_type)(q, k, v, mask)
        ref = reference(q, k, v, 1 / math.sqrt(8), causal(6, 6) & ~mask)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_mask_type_passed_at_call_overrides_the_module_default():
    q, k, v = qkv(sq=4)
    attn = make_attention(make_config(), AttnMaskType.causal)
    out = attn(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, 1 / math.sqrt(8), None),
                               rtol=1e-5, atol=1e-5)


def test_causal_bottom_right_aligns_queries_to_the_last_keys():
    q, k, v = qkv(sq=3, sk=7)
    out = make_attention(make_config(), AttnMaskType.causal_bottom_right)(q, k, v, None)
    ref = reference(q, k, v, 1 / math.sqrt(8), causal(3, 7, shift=4))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_bf16_inputs():
    q, k, v = qkv(dtype=torch.bfloat16)
    out = make_attention(make_config())(q, k, v, None)
    assert out.dtype == torch.bfloat16
    ref = reference(q, k, v, 1 / math.sqrt(8), causal(6, 6))
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_dropout_only_in_training():
    q, k, v = qkv(sq=16)
    attn = make_attention(make_config(dropout=0.5))
    ref = reference(q, k, v, 1 / math.sqrt(8), causal(16, 16))
    attn.eval()
    torch.testing.assert_close(attn(q, k, v, None).double(), ref, rtol=1e-5, atol=1e-5)
    attn.train()
    torch.manual_seed(0)
    dropped = attn(q, k, v, None)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(dropped.double(), ref, atol=1e-3)
    # the constructor argument wins over config.attention_dropout, as in mcore
    attn = make_attention(make_config(dropout=0.5), attention_dropout=0.0).train()
    torch.testing.assert_close(attn(q, k, v, None).double(), ref, rtol=1e-5, atol=1e-5)


def test_rejects_what_it_does_not_implement():
    q, k, v = qkv()
    attn = make_attention(make_config())
    with pytest.raises(ValueError, match="packed_seq_params=None"):
        attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(ValueError, match="attention_bias"):
        attn(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="needs an attention_mask"):
        attn(q, k, v, None, attn_mask_type=AttnMaskType.arbitrary)
    with pytest.raises(ValueError, match="must be bool"):
        attn(q, k, v, torch.zeros(2, 1, 6, 6), attn_mask_type=AttnMaskType.padding)
    with pytest.raises(ValueError, match="window_size=None"):
        make_attention(make_config(window_size=(4, 0)))


@pytest.mark.gpu
def test_cuda_bf16_matches_float64():
    q, k, v = (t.cuda() for t in qkv(sq=128, b=2, heads=8, groups=2, d=64, dtype=torch.bfloat16))
    out = make_attention(make_config(8, 2, 64))(q, k, v, None)
    ref = reference(q.cpu(), k.cpu(), v.cpu(), 1 / 8, causal(128, 128))
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-2, atol=2e-2)
