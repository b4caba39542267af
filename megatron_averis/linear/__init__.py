"""The quantized linear layer: one autograd function (function.py), its collectives (comm.py)."""

from megatron_averis.linear.comm import SINGLE_DEVICE, TPComm
from megatron_averis.linear.function import LinearContext, quantized_linear
from megatron_averis.linear.module import QuantizedLinear

__all__ = ["TPComm", "SINGLE_DEVICE", "LinearContext", "quantized_linear", "QuantizedLinear"]
