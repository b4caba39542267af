"""What the quantized linear keeps for backward, and a way to measure it.

The backward of an FP4 layer needs X only as its wgrad operand (Xᵀ quantized along tokens, or
X̂ itself under quantize-once) and W only as its dgrad operand. Forward builds those operands
and saves their packed payload through `save_for_backward`: FP4 codes two per byte, E4M3 or
E8M0 block scales, the FP32 tensor scale and the Averis mean μ̂. The BF16 X is not kept. Going
through `save_for_backward` (not attributes of the autograd context) lets
torch.autograd.graph.saved_tensors_hooks see, count, offload or compress exactly these tensors.

`SavedBytes` counts what a block of code saves for backward, with those hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_averis.numerics.blockscale import QuantizedTensor, TransposedQuantizedTensor
from megatron_averis.numerics.operand import QuantizedOperand


@dataclass(frozen=True)
class _QTLayout:
    fmt: str
    block: tuple[int, int]
    shape: tuple[int, int]  # of the saved payload
    transposed_view: bool = False  # rebuilt as that payload's transpose (a 16x16 Wᵀ)


@dataclass(frozen=True)
class OperandLayout:
    """Everything of a QuantizedOperand that is not a tensor, and how many tensors it saved."""

    shape: tuple[int, int]
    qt: _QTLayout | None  # None: a BF16 operand (one tensor)
    mean: _QTLayout | str | None  # "tensor", an NVFP4 mean's layout, or None
    mean_dim: int | None
    signs: torch.Tensor | None  # the layer's RHT signs (shared, not per call)
    transposed: bool
    has_bf16_scale: bool
    count: int


def _flatten_qt(qt: QuantizedTensor, out: list) -> _QTLayout:
    view = isinstance(qt, TransposedQuantizedTensor)
    if view:
        qt = qt.source  # the same bytes, and no transposed copy is made in forward
    out += qt.packed()
    return _QTLayout(qt.fmt, qt.block, qt.shape, view)


def _build_qt(tensors, layout: _QTLayout) -> QuantizedTensor:
    data, scales, tensor_scale = tensors
    qt = QuantizedTensor(data, scales, tensor_scale, layout.fmt, layout.block, layout.shape)
    return qt.t() if layout.transposed_view else qt


def pack_operands(ops) -> tuple[list[torch.Tensor], list[OperandLayout]]:
    """The tensors to hand to save_for_backward and the layouts to rebuild the operands from.
    Cached BF16 values (also those the quantize pass wrote) and the amax (used only while
    quantizing) are left behind."""
    tensors: list[torch.Tensor] = []
    layouts = []
    for op in ops:
        start = len(tensors)
        qt = None
        if op.qt is not None:
            qt = _flatten_qt(op.qt, tensors)
        else:
            tensors.append(op.bf16)
        mean = None
        if isinstance(op.mean, QuantizedTensor):
            mean = _flatten_qt(op.mean, tensors)
        elif op.mean is not None:
            tensors.append(op.mean)
            mean = "tensor"
        if op.bf16_scale is not None:
            tensors.append(op.bf16_scale)
        layouts.append(OperandLayout(tuple(op.shape), qt, mean, op.mean_dim, op.signs,
                                     op.transposed, op.bf16_scale is not None,
                                     len(tensors) - start))
    return tensors, layouts


def unpack_operands(tensors, layouts) -> list[QuantizedOperand]:
    """Inverse of pack_operands, from ctx.saved_tensors."""
    ops, i = [], 0
    for lay in layouts:
        part = list(tensors[i:i + lay.count])
        i += lay.count
        qt = bf16 = mean = scale = None
        if lay.qt is not None:
            qt, part = _build_qt(part[:3], lay.qt), part[3:]
        else:
            bf16, part = part[0], part[1:]
        if isinstance(lay.mean, _QTLayout):
            mean, part = _build_qt(part[:3], lay.mean), part[3:]
        elif lay.mean == "tensor":
            mean, part = part[0], part[1:]
        if lay.has_bf16_scale:
            scale = part[0]
        ops.append(QuantizedOperand(lay.shape, qt=qt, bf16=bf16, mean=mean, mean_dim=lay.mean_dim,
                                    signs=lay.signs, transposed=lay.transposed, bf16_scale=scale))
    return ops


class SavedBytes:
    """Bytes that autograd keeps for backward from what runs inside the `with` block: each
    storage counted once and whole (a view keeps its whole storage alive), except the storages
    of `exclude` (parameters: alive anyway). `by_dtype` splits the total by element type;
    `by_label` by what `label()` (if given) names when a storage is first saved, e.g. the
    module whose forward is running."""

    def __init__(self, exclude=(), label=None):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self._label = label
        self.total = 0
        self.by_dtype: dict[torch.dtype, int] = {}
        self.by_label: dict[str, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._excluded and key not in self._seen:
            self._seen.add(key)
            n = storage.nbytes()
            self.total += n
            self.by_dtype[t.dtype] = self.by_dtype.get(t.dtype, 0) + n
            if self._label is not None:
                name = self._label()
                self.by_label[name] = self.by_label.get(name, 0) + n
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class RunningModule:
    """Inside the `with` block, `name()` is the class name of the innermost module whose forward
    is running ("outside modules" between them): SavedBytes(label=tracker.name) then splits what
    is saved by the module that saved it. Global forward hooks, so only for measuring."""

    OUTSIDE = "outside modules"

    def __init__(self):
        self._stack: list[str] = []
        self._handles = []

    def name(self) -> str:
        return self._stack[-1] if self._stack else self.OUTSIDE

    def _enter(self, module, args):
        self._stack.append(type(module).__name__)

    def _exit(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def __enter__(self) -> "RunningModule":
        from torch.nn.modules import module as nn_module

        self._handles = [nn_module.register_module_forward_pre_hook(self._enter),
                         nn_module.register_module_forward_hook(self._exit)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self._stack = [], []
