"""Pure numerics: FP4 formats, rounding, block scaling, Hadamard transform, mean split, emulated GEMMs.

Nothing in this package touches torch.distributed: cross-rank statistics come in through the
`StatsReducer` hooks of `operand.quantize_operand`.
"""

from megatron_averis.numerics.blockscale import QuantizedTensor, quantize_mxfp4, quantize_nvfp4
from megatron_averis.numerics.e2m1 import decode_e2m1, encode_e2m1, pack_fp4, unpack_fp4
from megatron_averis.numerics.hadamard import blockwise_rht, hadamard_matrix, random_signs
from megatron_averis.numerics.operand import (
    LocalReducer,
    QuantizedOperand,
    StatsReducer,
    quantize_operand,
)
from megatron_averis.numerics.qgemm import qgemm

__all__ = [
    "QuantizedTensor",
    "QuantizedOperand",
    "StatsReducer",
    "LocalReducer",
    "quantize_nvfp4",
    "quantize_mxfp4",
    "quantize_operand",
    "encode_e2m1",
    "decode_e2m1",
    "pack_fp4",
    "unpack_fp4",
    "blockwise_rht",
    "hadamard_matrix",
    "random_signs",
    "qgemm",
]
