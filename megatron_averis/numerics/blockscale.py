"""Block-scaled FP4: NVFP4 (E4M3 block scales + FP32 tensor scale) and MXFP4 (E8M0 block scales).

Every quantizer works on a 2-D tensor [rows, cols] with blocks along the last dimension; callers
that need blocks along another dimension transpose first (see operand.py). NVFP4 follows
Transformer Engine's reference arithmetic step by step so that codes and scales match it bit for
bit:

    S_enc   = 448·6 / amax              (FP32; amax = 0 -> FLT_MAX, S_enc = 0 -> 1)
    s_blk   = E4M3(block_amax · S_enc/6)  (clamped to 448, RNE)
    code    = E2M1(x / (s_blk / S_enc))
    value   = code · s_blk · (1/S_enc)

Non-finite input: the tensor decode scale becomes NaN, so the whole dequantized tensor and any
GEMM it feeds are NaN. That keeps the hot path free of host syncs and lets the trainer's NaN
check report the step, instead of silently saturating an inf to ±6·s as TE's reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_averis.formats import (
    E2M1_EMAX,
    E2M1_MAX,
    E4M3_MAX,
    E8M0_BIAS,
    FLT_MAX,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
)
from megatron_averis.numerics import backend
from megatron_averis.numerics.e2m1 import (
    ROUNDING_MODES,
    decode_e2m1,
    encode_e2m1,
    pack_fp4,
    unpack_fp4,
)
from megatron_averis.numerics.hadamard import blockwise_rht
from megatron_averis.numerics.random import StepSeed, _positions, position_uniform, seed_key


def e8m0_to_fp32(biased: torch.Tensor) -> torch.Tensor:
    """2^(e - 127) for E8M0 codes, built from the FP32 bit pattern so that it is exact on every
    device (exp2 on CUDA is not exact for the subnormal result 2^-127); code 0xFF is NaN."""
    e = biased.to(torch.int32)
    bits = torch.where(e > 0, e << 23, torch.full_like(e, 1 << 22))
    s = bits.view(torch.float32)
    return torch.where(e == 0xFF, torch.full_like(s, float("nan")), s)


@dataclass
class QuantizedTensor:
    """FP4 codes with their block scales; blocks run along the last dimension of `shape`.

    data:         uint8 [rows, cols/2], two codes per byte
    block_scales: NVFP4: float8_e4m3fn [rows/bm, cols/bk]; MXFP4: uint8 E8M0 exponents [rows, cols/32]
    tensor_scale: FP32 scalar decode scale (1/S_enc for NVFP4, 1 for MXFP4)
    values:       code × block scale [rows, cols] (BF16 or FP32), when the quantize kernel wrote
                  it in the same pass (the GEMM operand); scaled_values() then returns it

    data and block_scales (the packed payload) are None for a GEMM-only tensor (quantized with
    payload=False, `values` set): it cannot be saved, communicated or fed to the fused GEMM.
    """

    data: torch.Tensor | None
    block_scales: torch.Tensor | None
    tensor_scale: torch.Tensor
    fmt: str
    block: tuple[int, int]
    shape: tuple[int, int]
    values: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def has_payload(self) -> bool:
        return self.data is not None

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, block scales, tensor scale): what is saved or communicated."""
        if self.data is None:
            raise ValueError(
                "this FP4 tensor was quantized for its GEMM only (payload=False / "
                "output='values'): it has no packed codes to save, communicate or transpose; "
                "quantize it with the payload (output='payload' or 'both')")
        return self.data, self.block_scales, self.tensor_scale

    def block_scales_fp32(self) -> torch.Tensor:
        """Per-element-row block scales [rows, cols/bk] as FP32."""
        if self.fmt == "mxfp4":
            s = e8m0_to_fp32(self.block_scales)
        else:
            s = self.block_scales.float()
        return s.repeat_interleave(self.block[0], dim=0) if self.block[0] > 1 else s

    def scaled_values(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """code · block scale, without the tensor scale. Exact in BF16 for both formats:
        a 2-bit E2M1 significand times a 4-bit E4M3 (or 1-bit E8M0) significand fits BF16's 8.
        Values written by the quantize pass are returned as they are (converted exactly if
        another dtype is asked for); nothing reads the codes again."""
        if self.values is not None:
            return self.values if self.values.dtype == dtype else self.values.to(dtype)
        fp4 = backend.dequantize_kernels(self.data, dtype)
        if fp4 is not None:
            return fp4.scaled_values(self.data, self.block_scales, self.block, self.fmt, dtype)
        rows, cols = self.shape
        codes = unpack_fp4(self.data)
        vals = decode_e2m1(codes).view(rows, cols // self.block[1], self.block[1])
        vals = vals * self.block_scales_fp32().unsqueeze(-1)
        return vals.view(rows, cols).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The represented values. code·s_blk·s_dec has up to 30 significant bits, so only the
        FP64 default is exact; GEMMs never use this (they apply s_dec to FP32 accumulators)."""
        return self.scaled_values(torch.float32).to(dtype) * self.tensor_scale.to(dtype)

    def t(self) -> "QuantizedTensor":
        """The transpose, without requantizing; only square (2-D) blocks are transpose-invariant.
        A view (TransposedQuantizedTensor): its scaled values are these values transposed, and
        its packed payload is built only if something reads it."""
        if self.block[0] != self.block[1]:
            raise ValueError(
                f"a {self.block[0]}x{self.block[1]}-block tensor cannot be transposed without "
                "requantizing; use 16x16 (2-D) blocks for operands needed in both orientations"
            )
        return TransposedQuantizedTensor(self)


class TransposedQuantizedTensor(QuantizedTensor):
    """Qᵀ of a 2-D-block QuantizedTensor Q, as a view.

    The GEMM emulation reads only scaled values, and cuBLAS takes the transposed view of Q's
    values as it is. So dgrad's Wᵀ operand costs no pass over W (the byte-wise unpack,
    transposed copy and repack took about 10 ms per llama-1b step on an H200). The packed
    payload (codes two per byte, transposed scales) is built on first access to `data`,
    `block_scales` or packed(): by a fused FP4 GEMM, Transformer Engine's native GEMM, or a
    caller that needs the bytes. A saved view keeps Q's payload (linear.saved), the same bytes."""

    def __init__(self, source: QuantizedTensor):  # no dataclass __init__: data is derived
        self.source = source
        self.tensor_scale = source.tensor_scale
        self.fmt, self.block = source.fmt, source.block
        self.shape = (source.shape[1], source.shape[0])
        self.values = None if source.values is None else source.values.t()
        self._payload = None

    def _transposed_payload(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._payload is None:
            data, block_scales, _ = self.source.packed()
            self._payload = (pack_fp4(unpack_fp4(data).t().contiguous()),
                             block_scales.t().contiguous())
        return self._payload

    @property
    def data(self) -> torch.Tensor | None:
        return self._transposed_payload()[0] if self.source.has_payload else None

    @property
    def block_scales(self) -> torch.Tensor | None:
        return self._transposed_payload()[1] if self.source.has_payload else None

    @property
    def has_payload(self) -> bool:
        return self.source.has_payload

    def scaled_values(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        if self.values is not None:
            return super().scaled_values(dtype)
        return self.source.scaled_values(dtype).t()

    def t(self) -> QuantizedTensor:
        return self.source


def _check_rounding(rounding: str, sr_seed: int | StepSeed | None) -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDING_MODES}")
    if rounding == "stochastic" and sr_seed is None:
        raise ValueError("stochastic rounding needs an sr_seed")


def _encode(
    scaled: torch.Tensor, rounding: str, sr_seed: int | StepSeed | None, rng_offset: tuple[int, int]
) -> torch.Tensor:
    uniform = None
    if rounding == "stochastic":
        _check_rounding(rounding, sr_seed)
        uniform = position_uniform(tuple(scaled.shape), sr_seed, rng_offset, scaled.device)
    return encode_e2m1(scaled, rounding, uniform)


def _check_2d(x: torch.Tensor, block: tuple[int, int], what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what} expects a 2-D tensor, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if cols % block[1] or rows % block[0]:
        raise ValueError(
            f"{what}: shape {tuple(x.shape)} is not divisible by the {block[0]}x{block[1]} block; "
            f"pad or choose sizes that are multiples of the block"
        )


def _fp32(x: torch.Tensor, subtract: torch.Tensor | None,
          signs: torch.Tensor | None = None) -> torch.Tensor:
    x32 = x.float() if subtract is None else x.float() - subtract
    return x32 if signs is None else blockwise_rht(x32, signs)


def _check_outputs(values: torch.dtype | None, payload: bool) -> None:
    if not payload and values is None:
        raise ValueError("payload=False keeps nothing: ask for the scaled values too "
                         "(values=torch.bfloat16) or keep the payload")


def _kernel_quantize(fp4, x: torch.Tensor, fmt: str, block: tuple[int, int], rounding: str,
                     sr_seed: int | StepSeed | None, rng_offset, **kw) -> QuantizedTensor:
    """The quantize kernel's result as a QuantizedTensor (with the scaled values when asked
    for). The stochastic-rounding stream is handed over as the reference defines it: the key of
    an int seed (random.seed_key) or a StepSeed's base and device-resident step, and
    index-tensor offsets checked by random._positions."""
    _check_rounding(rounding, sr_seed)
    if rounding == "stochastic":
        step = sr_seed.step if isinstance(sr_seed, StepSeed) else None
        key = sr_seed.base if step is not None else seed_key(sr_seed)
        offsets = tuple(_positions(o, n, x.device) if isinstance(o, torch.Tensor) else int(o)
                        for o, n in zip(rng_offset, x.shape))
        kw.update(sr_key=key, sr_step=step, rng_offset=offsets)
    data, scales, tensor_scale, values = fp4.quantize(x, fmt, block, **kw)
    return QuantizedTensor(data, scales, tensor_scale, fmt, tuple(block), tuple(x.shape), values)


def _kernel_outputs(x: torch.Tensor, values: torch.dtype | None, payload: bool) -> dict:
    """What the quantize kernel writes: the values where the dequantize kernel would run on
    them (backend), and the payload unless only values are asked for and written."""
    if values is not None and backend.dequantize_kernels(x, values) is None:
        return dict(values=None, payload=True)
    return dict(values=values, payload=payload)


def abs_max(x: torch.Tensor, subtract: torch.Tensor | None = None,
            signs: torch.Tensor | None = None) -> torch.Tensor:
    """max |x - subtract| in FP32 as a 0-dim tensor (NaN if any element is NaN); with `signs`,
    max |blockwise_rht(x - subtract, signs)|."""
    fp4 = backend.operand_kernels(x, signs)
    if fp4 is not None:
        return fp4.amax(x, subtract, signs=signs)
    return _fp32(x, subtract, signs).abs().amax()


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Largest |x| per block, shaped [rows/bm, cols/bk]."""
    rows, cols = x.shape
    bm, bk = block
    a = x.abs().float().view(rows // bm, bm, cols // bk, bk)
    return a.amax(dim=(1, 3))


def nvfp4_tensor_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_enc, decode scale) from the tensor amax, as Transformer Engine computes them."""
    amax = amax.float().reshape(())
    one = torch.ones_like(amax)
    # Tensor / tensor: a correctly rounded IEEE division on every device (a Python scalar
    # numerator may be computed as scalar · reciprocal(amax), rounding twice).
    s_enc = torch.clamp(one * (E4M3_MAX * E2M1_MAX) / amax, max=FLT_MAX)
    s_enc = torch.where(s_enc == 0, one, s_enc)
    s_dec = one / s_enc
    s_dec = torch.where(torch.isfinite(amax), s_dec, torch.full_like(s_dec, float("nan")))
    return s_enc, s_dec


def quantize_nvfp4(
    x: torch.Tensor,
    block: tuple[int, int] = (1, NVFP4_BLOCK),
    rounding: str = "rne",
    sr_seed: int | StepSeed | None = None,
    rng_offset: tuple[int, int] = (0, 0),
    amax: torch.Tensor | None = None,
    subtract: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
    values: torch.dtype | None = None,
    payload: bool = True,
) -> QuantizedTensor:
    """NVFP4 along the last dimension with 1x16 or 16x16 blocks.

    `amax` overrides the tensor amax (tensor parallelism passes the group-wide value so that every
    shard gets the scale the whole tensor would have). `rng_offset` is this tensor's (row, col)
    position in the full tensor, so a shard draws the same stochastic-rounding bits as the whole.
    `subtract` ([1, cols] or [rows, 1], FP32): quantize x.float() - subtract (the Averis residual;
    the GPU kernel subtracts in registers instead of materializing it). `signs`: quantize
    blockwise_rht(x.float() - subtract, signs) (the kernel rotates in registers, too).

    `values` (BF16 or FP32) and `payload` are requests to the GPU kernel: it writes the scaled
    values (the GEMM operand) in the quantize pass, and with payload=False skips the packed
    codes and scales. The reference computes the payload regardless and the values on demand;
    either way scaled_values() returns the same bits.
    """
    _check_outputs(values, payload)
    if block not in ((1, NVFP4_BLOCK), (NVFP4_BLOCK, NVFP4_BLOCK)):
        raise ValueError(f"NVFP4 blocks are 1x16 or 16x16, got {block[0]}x{block[1]}")
    _check_2d(x, block, "NVFP4 quantization")
    fp4 = backend.operand_kernels(x, signs)
    if fp4 is not None:
        return _kernel_quantize(fp4, x, "nvfp4", block, rounding, sr_seed, rng_offset,
                                amax_t=amax, sub=subtract, signs=signs, **_kernel_outputs(
                                    x, values, payload))
    x32 = _fp32(x, subtract, signs)
    if amax is None:
        amax = x32.abs().amax()
    s_enc, s_dec = nvfp4_tensor_scales(amax)
    blk_amax = block_amax(x32, block)
    s_blk = torch.clamp(blk_amax * (s_enc * (1.0 / E2M1_MAX)), max=FLT_MAX)
    s_blk = torch.clamp(s_blk, max=E4M3_MAX).to(torch.float8_e4m3fn)
    enc = torch.clamp(torch.ones_like(blk_amax) / (s_blk.float() * s_dec), max=FLT_MAX)
    if block[0] > 1:
        enc = enc.repeat_interleave(block[0], dim=0)
    rows, cols = x.shape
    scaled = x32.view(rows, cols // block[1], block[1]) * enc.unsqueeze(-1)
    codes = _encode(scaled.view(rows, cols), rounding, sr_seed, rng_offset)
    return QuantizedTensor(pack_fp4(codes), s_blk, s_dec, "nvfp4", block, (rows, cols))


def quantize_mxfp4(
    x: torch.Tensor,
    rounding: str = "rne",
    sr_seed: int | StepSeed | None = None,
    rng_offset: tuple[int, int] = (0, 0),
    subtract: torch.Tensor | None = None,
    signs: torch.Tensor | None = None,
    values: torch.dtype | None = None,
    payload: bool = True,
) -> QuantizedTensor:
    """MXFP4 along the last dimension: 1x32 blocks, shared scale 2^(floor(log2 amax) - 2) in E8M0.

    This is the OCP MX v1.0 rule (elements above 6 after scaling saturate). A block of zeros gets
    the smallest scale, 2^-127. Non-finite blocks decode to NaN (E8M0 code 0xFF). `subtract`,
    `signs`, `values` and `payload` as in quantize_nvfp4.
    """
    _check_outputs(values, payload)
    block = (1, MXFP4_BLOCK)
    _check_2d(x, block, "MXFP4 quantization")
    fp4 = backend.operand_kernels(x, signs)
    if fp4 is not None:
        return _kernel_quantize(fp4, x, "mxfp4", block, rounding, sr_seed, rng_offset,
                                sub=subtract, signs=signs, **_kernel_outputs(x, values, payload))
    x32 = _fp32(x, subtract, signs)
    rows, cols = x.shape
    amax = block_amax(x32, block)
    # frexp gives amax = m·2^e with m in [0.5, 1): floor(log2 amax) = e - 1 exactly.
    _, e = torch.frexp(amax)
    exp = torch.where(amax > 0, e - 1 - E2M1_EMAX, torch.full_like(e, -E8M0_BIAS))
    exp = torch.clamp(exp, -E8M0_BIAS, E8M0_BIAS)
    codes8 = (exp + E8M0_BIAS).to(torch.uint8)
    codes8 = torch.where(torch.isfinite(amax), codes8, torch.full_like(codes8, 0xFF))
    scale = e8m0_to_fp32((exp + E8M0_BIAS).to(torch.uint8))
    scaled = x32.view(rows, cols // MXFP4_BLOCK, MXFP4_BLOCK) / scale.unsqueeze(-1)
    codes = _encode(scaled.view(rows, cols), rounding, sr_seed, rng_offset)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    return QuantizedTensor(pack_fp4(codes), codes8, one, "mxfp4", block, (rows, cols))
