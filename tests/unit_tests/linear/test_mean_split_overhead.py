"""What the Averis split adds to a quantized linear's forward + backward, outside the quantizer,
the dequantizer and the GEMMs: vector work only (μ's sums, its storage casts, GEMVs), never a
cast of a whole operand to FP32 (a weight-sized FP32 copy per GEMM cost ~5 ms per Llama-1B step
on the H200 before the GEMV read the BF16 values directly)."""

from __future__ import annotations

import functools
import importlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_averis.linear.module import QuantizedLinear
from megatron_averis.numerics.blockscale import QuantizedTensor

# The modules (the package re-exports functions of the same names).
operand = importlib.import_module("megatron_averis.numerics.operand")
qgemm = importlib.import_module("megatron_averis.numerics.qgemm")

VIEWS = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "detach", "expand",
         "as_strided", "alias", "unsqueeze", "squeeze"}


class _OutsideOps(TorchDispatchMode):
    """aten ops (views aside) and FP32 casts run outside the wrapped quantize/GEMM internals."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.ops = 0
        self.fp32_casts = []  # shapes of tensors converted to FP32

    def inside(self, f):
        @functools.wraps(f)
        def run(*args, **kwargs):
            self.depth += 1
            try:
                return f(*args, **kwargs)
            finally:
                self.depth -= 1
        return run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth == 0:
            name = func.overloadpacket.__name__
            self.ops += name not in VIEWS
            if name == "_to_copy" and out.dtype == torch.float32:
                self.fp32_casts.append(tuple(args[0].shape))
        return out


def _outside_ops(monkeypatch, recipe: str) -> _OutsideOps:
    torch.manual_seed(0)
    lin = QuantizedLinear(128, 384, bias=False, recipe=recipe)
    x = torch.randn(256, 128, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(256, 384, dtype=torch.bfloat16)
    mode = _OutsideOps()
    # pairwise_sum: the CPU reference of the token sums (the default token_sum), one read of the
    # operand in the GPU stats kernel, like abs_max's amax pass.
    for name in ("quantize_nvfp4", "quantize_mxfp4", "abs_max", "blockwise_rht", "pairwise_sum"):
        monkeypatch.setattr(operand, name, mode.inside(getattr(operand, name)))
    monkeypatch.setattr(qgemm, "mm_fp32", mode.inside(qgemm.mm_fp32))
    monkeypatch.setattr(qgemm, "_product_plus_terms", mode.inside(qgemm._product_plus_terms))
    monkeypatch.setattr(QuantizedTensor, "scaled_values",
                        mode.inside(QuantizedTensor.scaled_values))
    with mode:
        lin(x).backward(g)
    return mode


def test_mean_split_adds_vector_work_only(monkeypatch):
    # (averis-rht's CPU reference rotates wgrad's residual in FP32 outside the quantizer; the
    # GPU kernels fuse that rotation.)
    split = _outside_ops(monkeypatch, "averis")
    plain = _outside_ops(monkeypatch, "nvfp4-nohadamard")
    # Every FP32 conversion outside the quantizer is of a vector (a mean), none of an operand.
    assert split.fp32_casts and all(len(s) == 1 for s in split.fp32_casts), split.fp32_casts
    # X's and G's means: sums, division, BF16 storage and one FP32 form per operand object
    # (rowwise X, rowwise G, X's operand unpacked in backward), the two GEMVs and their scales.
    assert len(split.fp32_casts) <= 3
    assert split.ops - plain.ops <= 16, (split.ops, plain.ops)
