"""Per-layer state of the TE adapter: which layer a quantizer belongs to, and its TP layout.

TE passes a qfactory only the role (module type, tensor type, name). The layer a quantizer
serves decides its stochastic-rounding stream, its tensor-parallel group and where its shard
sits in the full tensor, so the factory finds the TE module that is building its quantizers in
the caller chain (TE's `set_meta_tensor(self=module, ...)` calls `make_quantizers`, which calls
the factory). TE builds a module's forward and backward quantizers together, so both find the
same module and share one LayerState. If the module cannot be found (another caller, a TE
version that builds quantizers elsewhere), the slot gets a single-device context linked to the
most recent input slot, with a warning: FP4 is then per TP shard, as TE's own recipes do.
"""

from __future__ import annotations

import sys
import warnings
import weakref

from megatron_averis.linear.comm import TPComm
from megatron_averis.linear.function import LinearContext
from megatron_averis.recipes import Recipe

# Stream ids per pipeline stage kept apart, as megatron.parallel_linear does.
STAGE_STRIDE = 1 << 20
_FRAMES_SEARCHED = 12
UB_FLAGS = ("ub_overlap_ag_fprop", "ub_overlap_rs_fprop", "ub_overlap_ag_dgrad",
            "ub_overlap_rs_dgrad", "ub_bulk_dgrad", "ub_bulk_wgrad")


def find_calling_module(base_class, depth: int = 2):
    """The nearest `self` up the call stack that is an instance of `base_class`, else None."""
    frame = sys._getframe(depth)
    for _ in range(_FRAMES_SEARCHED):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, base_class):
            return obj
        frame = frame.f_back
    return None


def check_module(module) -> None:
    """Refuse module options that TE's custom-GEMM dispatch cannot honour, naming the fix."""
    where = f"{type(module).__name__} under the Averis CustomRecipe"
    if getattr(module, "fuse_wgrad_accumulation", False):
        raise ValueError(f"{where}: TE hands custom GEMMs no output buffer, so wgrad cannot be "
                         "accumulated into main_grad; turn gradient-accumulation fusion off "
                         "(TransformerConfig(gradient_accumulation_fusion=False), Megatron-LM's "
                         "--no-gradient-accumulation-fusion)")
    if getattr(module, "use_bias", False):
        raise ValueError(f"{where}: TE's backward fuses the bias gradient into quantization "
                         "(bgrad_quantize), which takes TE's own quantizers only; build the "
                         "linears without bias (add_bias_linear=False, Megatron-LM's "
                         "--disable-bias-linear)")
    if any(getattr(module, f, False) for f in UB_FLAGS):
        raise ValueError(f"{where}: custom GEMMs bypass Userbuffers; turn TP communication "
                         "overlap off (Megatron-LM's --tp-comm-overlap)")


def _megatron_ranks() -> tuple[int, int]:
    """(pipeline stage, data+context-parallel replica) from megatron-core when initialised."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 0
    return (parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True))


class LayerState:
    """A layer's LinearContext and its call counters, shared by all its quantizers.

    Each (slot, usage) counts its own quantizations: the n-th forward's input and weight and
    the n-th backward's output gradient all get call index n, which is QuantizedLinear's call
    index when backward runs in forward order (1F1B pipelines, plain steps). The counters live
    here, not on a quantizer, so that TE rebuilding a module's quantizers does not restart them
    (which would repeat the stochastic-rounding bits)."""

    def __init__(self, ctx: LinearContext):
        self.ctx = ctx
        self._calls: dict[tuple[str, str], int] = {}

    def next_call(self, kind: str, usage: str) -> int:
        n = self._calls.get((kind, usage), 0) + 1
        self._calls[(kind, usage)] = n
        return n


class LayerRegistry:
    """One LayerState per TE module, created the first time the factory sees the module."""

    def __init__(self, recipe: Recipe, first_stream: int = 0):
        self.recipe = recipe
        self._next_stream = first_stream
        self._by_module: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._last_unbound: LayerState | None = None
        self._warned = False

    def _stream(self) -> int:
        stage, _ = _megatron_ranks()
        sid = stage * STAGE_STRIDE + self._next_stream
        self._next_stream += 1
        return sid

    def state_for(self, module, kind: str) -> LayerState:
        if module is None:
            return self._unbound(kind)
        state = self._by_module.get(module)
        if state is None:
            check_module(module)
            mode = getattr(module, "parallel_mode", None) or "none"
            group = getattr(module, "tp_group", None) if getattr(module, "tp_size", 1) > 1 else None
            weight = getattr(module, "weight", None)
            stride = getattr(module, "stride", None) or getattr(weight, "partition_stride", 1)
            ctx = LinearContext(recipe=self.recipe, mode=mode if mode in ("column", "row") else "none",
                                comm=TPComm(group),
                                sequence_parallel=bool(getattr(module, "sequence_parallel", False))
                                and group is not None and mode in ("column", "row"),
                                out_stride=int(stride), stream_id=self._stream(),
                                replica_id=_megatron_ranks()[1])
            state = self._by_module[module] = LayerState(ctx)
        return state

    def _unbound(self, kind: str) -> LayerState:
        if not self._warned:
            warnings.warn("Averis TE factory: could not find the TE module requesting quantizers; "
                          "its GEMMs are quantized per tensor-parallel shard (no group-wide "
                          "statistics)", stacklevel=3)
            self._warned = True
        if kind == "input" or self._last_unbound is None:
            self._last_unbound = LayerState(LinearContext(recipe=self.recipe,
                                                          stream_id=self._stream(),
                                                          replica_id=_megatron_ranks()[1]))
        return self._last_unbound
