"""Core attention for megatron-core's SelfAttention on PyTorch scaled_dot_product_attention.

Replaces Transformer Engine's TEDotProductAttention (and mcore's local DotProductAttention, which
materialises the [b, heads, s, s] score matrix in Python). On GPU, SDPA picks a flash or
memory-efficient kernel itself when the inputs allow it: for the flash kernel, call the model
with attention_mask=None and the causal mask type (GPT training), so that no explicit mask is
built.

Context parallelism (context_parallel_size > 1): each CP rank holds megatron-core's load-balanced
"zigzag" share of the sequence (of 2·cp equal chunks, rank r holds chunks r and 2·cp-1-r, as
megatron.core.utils.get_batch_on_this_cp_rank slices a batch). Keys and values are all-gathered
over the CP group (one collective per layer; backward reduce-scatters their gradients) and the
local queries attend to the whole sequence under a mask built from global token positions. That
mask is explicit, so SDPA uses the memory-efficient (or math) kernel rather than flash there.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_averis.linear.comm import TPComm

# SDPA takes GQA key/value heads directly from torch 2.5 on.
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


class SDPACoreAttention(MegatronModule):
    """softmax(q·kᵀ · scale + mask) · v over [s, b, heads, head_dim] tensors, as mcore expects.

    Inputs (from SelfAttention): query [sq, b, np, hn], key/value [sk, b, ng, hn] with np a
    multiple of ng (grouped-query attention: query head i reads key/value group i // (np/ng)).
    Output: [sq, b, np·hn].

    attention_mask follows mcore: a bool tensor broadcastable to [b, np, sq, sk], True = masked.
    The mask type decides what is applied:
      causal               top-left causal (query i sees keys 0..i), plus attention_mask if given
      causal_bottom_right  causal aligned to the last key (KV-cache prefill), plus attention_mask
      padding / arbitrary  attention_mask only (padding with no mask = attend everywhere)
      padding_causal       top-left causal plus attention_mask
      no_mask              nothing

    Under context parallelism query/key/value hold this CP rank's zigzag tokens (see the module
    docstring); keys and values are gathered, "causal" compares global positions, and a given
    attention_mask must be [b or 1, 1, sq (local queries), cp·sk (all keys, in sequence order)],
    which is what get_batch_on_this_cp_rank leaves of a full [b, 1, s, s] mask.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        self.cp_comm = None
        if config.context_parallel_size > 1:
            self.cp_comm = self._cp_comm(config, attention_type, cp_comm_type, pg_collection)
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"SDPACoreAttention supports softmax_type='vanilla' only (got {config.softmax_type!r})"
            )
        if config.window_size is not None:
            raise ValueError("SDPACoreAttention has no sliding-window attention; set window_size=None")
        if config.qk_clip:
            raise ValueError(
                "qk_clip needs the per-head max attention logit, which SDPA does not expose; "
                "set qk_clip=False"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels
        # config.apply_query_key_layer_scaling only guards FP16 overflow in mcore's unfused
        # softmax (it divides then re-multiplies by the layer number); SDPA accumulates in FP32,
        # so the effective scale is the same and the option needs nothing here.
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError(
                "SDPACoreAttention takes [s, b, h, d] batches only; packed sequences (THD) need "
                "Transformer Engine attention: pass packed_seq_params=None"
            )
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention takes no attention_bias; pass attention_bias=None")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, heads, _ = query.shape
        groups = key.shape[2]
        if heads % groups:
            raise ValueError(f"{heads} query heads do not split into {groups} key/value groups")

        q_pos = None  # global positions of the local queries; None: 0..sq-1 (no CP)
        if self.cp_comm is not None:
            if mask_type == AttnMaskType.causal_bottom_right:
                raise ValueError("causal_bottom_right (KV-cache inference) has no context-parallel "
                                 "layout; run it with context_parallel_size=1")
            q_pos = zigzag_positions(sq, self.cp_comm.rank, self.cp_comm.world, query.device)
            # K and V travel together: one all-gather (and one reduce-scatter) per layer.
            key, value = gather_zigzag(torch.cat((key, value), dim=-1), self.cp_comm).split(
                (key.shape[-1], value.shape[-1]), dim=-1)
        sk = key.shape[0]

        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        keep, is_causal = self._mask(mask_type, attention_mask, sq, sk, q.device, q_pos)
        gqa = {}
        if groups != heads:
            # Flash supports GQA natively; the kernels that take a mask need expanded heads.
            if keep is None and _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)

        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p, q):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, **gqa,
            )
        # [b, h, sq, d] -> [sq, b, h·d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    @staticmethod
    def _cp_comm(config, attention_type, cp_comm_type, pg_collection) -> TPComm:
        """The CP group's communicator, after refusing what the all-gather scheme does not do."""
        if attention_type != "self":
            raise ValueError("SDPACoreAttention splits self-attention only over context-parallel "
                             f"ranks (got attention_type={attention_type!r}); set "
                             "context_parallel_size=1")
        if cp_comm_type not in (None, "all_gather"):
            raise ValueError("SDPACoreAttention implements context parallelism by all-gathering "
                             f"keys and values; set cp_comm_type=None or 'all_gather' (got "
                             f"{cp_comm_type!r})")
        group = getattr(pg_collection, "cp", None)
        if group is None:
            group = parallel_state.get_context_parallel_group()
        comm = TPComm(group)
        if comm.world != config.context_parallel_size:
            raise ValueError(f"the context-parallel group has {comm.world} ranks but "
                             f"config.context_parallel_size={config.context_parallel_size}; "
                             "initialize parallel_state with the same context_parallel_size")
        return comm

    @staticmethod
    def _mask(mask_type, attention_mask, sq, sk, device, q_pos=None):
        """(SDPA keep-mask or None, is_causal) for mcore's mask type and bool mask.

        q_pos: global positions of the queries among the sk keys (context parallelism), or None
        for queries 0..sq-1."""
        if mask_type == AttnMaskType.no_mask:
            return None, False
        top_left = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        causal = top_left or mask_type == AttnMaskType.causal_bottom_right
        if mask_type == AttnMaskType.arbitrary and attention_mask is None:
            raise ValueError("attn_mask_type=arbitrary needs an attention_mask")
        if attention_mask is None:
            if not causal:
                return None, False
            if top_left and q_pos is None:
                return None, True  # the only case the flash kernel takes
        keep = None
        if causal:
            # key j is visible to query i when j <= i (+ sk - sq when aligned to the last key)
            shift = 0 if top_left else sk - sq
            i = (torch.arange(sq, device=device) if q_pos is None else q_pos).unsqueeze(1)
            j = torch.arange(sk, device=device).unsqueeze(0)
            keep = j <= i + shift
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"attention_mask must be bool (True = masked) as in megatron-core, "
                    f"got {attention_mask.dtype}"
                )
            keep = ~attention_mask if keep is None else keep & ~attention_mask
        # A query that may see no key would give NaN (softmax over nothing); let such rows, which
        # only padding produces and the loss masks out, attend everywhere instead.
        keep = keep | ~keep.any(dim=-1, keepdim=True)
        return keep, False

    def _dropout_rng(self, dropout_p, q):
        """As mcore's DotProductAttention: without sequence parallelism each TP rank holds
        different heads, so attention dropout draws from the per-TP-rank CUDA RNG stream."""
        if dropout_p > 0 and q.is_cuda and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


def zigzag_positions(s_local: int, rank: int, world: int, device=None) -> torch.Tensor:
    """Global positions of the s_local tokens that CP rank `rank` of `world` holds: chunks rank
    and 2·world-1-rank of the sequence cut into 2·world equal chunks (mcore's load balancing)."""
    if s_local % 2:
        raise ValueError(f"{s_local} tokens per context-parallel rank do not form 2 equal chunks; "
                         f"make the sequence length divisible by 2·context_parallel_size = "
                         f"{2 * world}")
    c = s_local // 2
    first, second = rank * c, (2 * world - 1 - rank) * c
    return torch.cat((torch.arange(first, first + c, device=device),
                      torch.arange(second, second + c, device=device)))


class _GatherZigzag(torch.autograd.Function):
    """[s_local, ...] zigzag shards -> [cp·s_local, ...] in sequence order; the backward sums
    every rank's gradient of the full sequence and keeps this rank's shard."""

    @staticmethod
    def forward(ctx, t, comm):
        ctx.comm = comm
        parts = comm.gather(t, dim=0).chunk(comm.world, dim=0)  # rank order
        chunks = [None] * (2 * comm.world)
        for r, part in enumerate(parts):
            chunks[r], chunks[2 * comm.world - 1 - r] = part.chunk(2, dim=0)
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad):
        comm = ctx.comm
        chunks = grad.chunk(2 * comm.world, dim=0)
        rank_order = torch.cat([chunks[i] for r in range(comm.world)
                                for i in (r, 2 * comm.world - 1 - r)], dim=0)
        return comm.reduce_scatter(rank_order), None


def gather_zigzag(t: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """All-gather CP shards (sequence first) into the whole sequence, differentiably."""
    return _GatherZigzag.apply(t, comm)
