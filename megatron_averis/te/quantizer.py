"""Transformer Engine classes of the adapter: a custom Quantizer and its quantized storage.

Imported only when TE is (factories.py imports it on the first quantizer request). The
contract, read from TE 2.20's source (custom_recipes/gemm.py, quantized_tensor.py,
module/linear.py): a custom quantizer has `custom = True` and returns a QuantizedTensorStorage
with `custom = True`; TE routes every GEMM that sees such a storage to
`storage._quantizer.qgemm(...)` (the input's or gradient's quantizer), after checking that the
fields data/scale (rowwise) and data_t/scale_t (columnwise) it needs are not None. For
sequence parallelism TE gathers a custom quantizer's tensor in high precision and then
quantizes the gathered tensor.
"""

from __future__ import annotations

import copy

import torch
from transformer_engine.common.recipe import CustomRecipe
from transformer_engine.pytorch.quantized_tensor import QuantizedTensorStorage, Quantizer

from megatron_averis.linear.operands import OperandPair, quantize_tensor
from megatron_averis.te import core, native
from megatron_averis.te.binding import LayerState
from megatron_averis.te.stats import holds_shard


def _fields(op):
    """(codes, scale) TE's dispatch checks for presence; a BF16 operand is its own data."""
    if op is None:
        return None, None
    if op.qt is None:
        return op.bf16, op.scale()
    return op.qt.data, op.qt.block_scales


class AverisTensorStorage(QuantizedTensorStorage):
    """The GEMM operands of one tensor: `pair.rowwise` / `pair.columnwise` (linear.operands.OperandPair)."""

    def __init__(self, pair: OperandPair, original_shape, dtype: torch.dtype, quantizer):
        self.pair = pair
        self.original_shape = tuple(original_shape)
        self._dtype = dtype
        self._quantizer = quantizer
        op = pair.rowwise or pair.columnwise
        self.device = (op.qt.data if op.qt is not None else op.bf16).device

    @property
    def custom(self) -> bool:
        return True

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    # The fields TE's custom GEMM dispatch reads before calling qgemm.
    @property
    def data(self):
        return _fields(self.pair.rowwise)[0]

    @property
    def scale(self):
        return _fields(self.pair.rowwise)[1]

    @property
    def data_t(self):
        return _fields(self.pair.columnwise)[0]

    @property
    def scale_t(self):
        return _fields(self.pair.columnwise)[1]

    def size(self, dim: int | None = None):
        s = torch.Size(self.original_shape)
        return s if dim is None else s[dim]

    def get_usages(self) -> dict:
        return {"rowwise": self.pair.rowwise is not None,
                "columnwise": self.pair.columnwise is not None}

    def update_usage(self, rowwise_usage: bool | None = None, columnwise_usage: bool | None = None):
        """Drop usages TE no longer needs; a missing one can only be derived for 2-D weight
        tiles (transpose), anything else must have been requested at quantization."""
        if columnwise_usage and self.pair.columnwise is None:
            row = self.pair.rowwise
            if row is None or row.qt is None or row.qt.block[0] == 1 or row.mean is not None:
                raise RuntimeError("columnwise usage was not quantized and cannot be derived; "
                                   "the quantizer must be asked for it (set_usage) beforehand")
            self.pair.columnwise = row.t()
        if rowwise_usage and self.pair.rowwise is None:
            raise RuntimeError("rowwise usage was not quantized and cannot be derived")
        if rowwise_usage is False:
            self.pair.rowwise = None
        if columnwise_usage is False:
            self.pair.columnwise = None

    def prepare_for_saving(self):
        # The operands stay referenced by this object, which TE keeps for backward.
        return [], self

    def restore_from_saved(self, tensors):
        return tensors

    def clear(self):
        self.pair = OperandPair(None, None)

    def copy_from_storage(self, src: "AverisTensorStorage") -> None:
        self.pair = OperandPair(src.pair.rowwise, src.pair.columnwise)
        self.original_shape, self._dtype = src.original_shape, src._dtype

    def dequantize(self, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The represented tensor (mean term included, rotation undone), in `dtype`."""
        dtype = dtype or self._dtype
        if self.pair.rowwise is not None:
            x = self.pair.rowwise.dequantize()
        elif self.pair.columnwise is not None:
            x = self.pair.columnwise.dequantize().t()
        else:
            raise RuntimeError("dequantize: the storage holds no data")
        return x.to(dtype).reshape(self.original_shape)

    def __repr__(self):
        return (f"AverisTensorStorage(shape={self.original_shape}, dtype={self._dtype}, "
                f"usages={self.get_usages()})")


class AverisQuantizer(Quantizer):
    """Quantizes one tensor slot (input, weight or output gradient) of one TE linear module
    with our recipe; its qgemm is our emulated (or, on Blackwell, native) FP4 GEMM."""

    def __init__(self, kind: str, state: LayerState, *, rowwise: bool = True,
                 columnwise: bool = True):
        super().__init__(rowwise=rowwise, columnwise=columnwise)
        self.kind = kind
        self.state = state
        # TE's protocol: set before a quantization that may see a sequence-parallel shard.
        self.with_amax_reduction = False
        self.amax_reduction_group = None

    @property
    def custom(self) -> bool:
        return True

    def copy(self) -> "AverisQuantizer":
        return copy.copy(self)  # shares the layer state (context and call counters)

    def _tokens_sharded(self, x2d: torch.Tensor) -> bool:
        group = self.amax_reduction_group if self.with_amax_reduction else None
        if self.kind == "weight" or group is None or not holds_shard(x2d, group):
            return False
        comm = self.state.ctx.comm
        if comm.group is None or comm.world != torch.distributed.get_world_size(group):
            raise RuntimeError("TE quantizes a sequence-parallel shard over a group that is not "
                               "this layer's tensor-parallel group")
        return True

    def quantize(self, tensor: torch.Tensor, *, out=None, dtype=None, **_) -> AverisTensorStorage:
        if out is not None:
            return self.update_quantized(tensor, out)
        shape = tuple(tensor.shape)
        x2d = tensor.reshape(-1, shape[-1])
        try:
            sharded = self._tokens_sharded(x2d)
            row, col = self.rowwise_usage, self.columnwise_usage
            if not (row or col):
                raise RuntimeError("quantize called with neither rowwise nor columnwise usage")
            # Weights: one call index per quantization (fprop and dgrad operands together).
            row_call = self.state.next_call(self.kind, "row") if row or self.kind == "weight" else 0
            col_call = (row_call if self.kind == "weight"
                        else self.state.next_call(self.kind, "col") if col else 0)
            pair = quantize_tensor(self.state.ctx, self.kind, x2d, rowwise=row, columnwise=col,
                                   row_call=row_call, col_call=col_call, tokens_sharded=sharded)
        finally:
            # As TE's Quantizer.quantize: the group never outlives the call it was set for.
            self.with_amax_reduction, self.amax_reduction_group = False, None
        return AverisTensorStorage(pair, shape, tensor.dtype, self)

    def update_quantized(self, src: torch.Tensor, dst: AverisTensorStorage, *,
                         noop_flag: torch.Tensor | None = None) -> AverisTensorStorage:
        if noop_flag is not None and noop_flag.item() != 0:
            return dst
        dst.copy_from_storage(self.quantize(src))
        return dst

    def qgemm(self, qx, qw, m_params, out_dtype, sx, sw, bias=None, out=None,
              accumulate=False, gemm_type=None, qresult_x=None, qresult_w=None):
        """TE's custom GEMM hook: qresult_x / qresult_w are the storages (input or gradient,
        weight or input); the raw fields qx, sx, ... are ours and not needed."""
        if out is not None or accumulate:
            raise ValueError("custom GEMMs do not accumulate into an output buffer; turn "
                             "gradient-accumulation fusion off")
        gemm = getattr(gemm_type, "value", gemm_type)
        a, b = core.gemm_operands(gemm, qresult_x.pair, qresult_w.pair)
        fp4_gemm = self.state.ctx.recipe.fp4_gemm
        return core.gemm(gemm, qresult_x.pair, qresult_w.pair, out_dtype, bias,
                         product=native.product_for(a, b, fp4_gemm), fp4_gemm=fp4_gemm)

    def supports_only_rowwise_all_gather(self) -> bool:
        return False

    def _get_compatible_recipe(self):
        return CustomRecipe

    def __repr__(self):
        return (f"AverisQuantizer(kind={self.kind}, recipe={self.state.ctx.recipe.name}, "
                f"rowwise={self.rowwise_usage}, columnwise={self.columnwise_usage})")
