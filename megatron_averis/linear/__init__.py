"""The quantized linear layer: one autograd function (function.py), its collectives (comm.py),
the per-role quantizer it shares with the Transformer Engine adapter (operands.py) and what it
saves for backward (saved.py)."""

from megatron_averis.linear.comm import SINGLE_DEVICE, TPComm
from megatron_averis.linear.function import LinearContext, quantized_linear
from megatron_averis.linear.module import QuantizedLinear
from megatron_averis.linear.operands import OperandPair, quantize_role, quantize_tensor

__all__ = ["TPComm", "SINGLE_DEVICE", "LinearContext", "quantized_linear", "QuantizedLinear",
           "OperandPair", "quantize_role", "quantize_tensor"]
