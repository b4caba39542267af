"""GEMM operands: the Averis mean split, optional Hadamard rotation, FP4 quantization.

Layout. An operand is 2-D [rows, K] with K the reduction dimension of the GEMM it feeds; blocks
run along K. fprop feeds X [tokens, in] and W [out, in]; dgrad G [tokens, out] and Wᵀ [in, out];
wgrad Gᵀ [out, tokens] and Xᵀ [in, tokens]. `transposed=True` records that an operand is the
transpose of its source tensor (quantized along the source's first dimension).

Averis split (Averis paper, Sec. 3). The mean over tokens is taken along dimension `mean_dim` of
the operand: 0 for fprop/dgrad operands (tokens are rows, μ is indexed by K) and 1 for wgrad
operands (tokens are the reduction dimension, μ is indexed by rows). With μ̂ the stored mean
(after rounding to its own format) the operand is exactly

    mean_dim=0:  A = 1·μ̂ᵀ + R        mean_dim=1:  A = μ̂·1ᵀ + R

and only R is FP4-quantized. μ̂ is subtracted before quantization, so μ's own rounding error lands
in R and is quantized with it instead of being lost.

Hadamard rotation (NVIDIA recipe). With signs, the operand is multiplied along K by a blockwise
orthogonal H. For mean_dim=0 the stored μ̂ is the rotated mean; for mean_dim=1 R is rotated and
the mean term becomes μ̂·eᵀ with e = Hᵀ·1, so both identities keep the same form. With the GPU
kernels the rotation of R (mean_dim=1, or no split) is fused into the quantization; for mean_dim=0
the rotated operand is materialized, since its mean is taken over tokens first.

Distribution. Column sums, token counts and the amax go through a `StatsReducer`, so tensor /
sequence parallelism can all-reduce them and every shard quantizes with the statistics of the
full tensor. This module never calls torch.distributed itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from megatron_averis.numerics import backend
from megatron_averis.numerics.blockscale import (
    QuantizedTensor,
    abs_max,
    quantize_mxfp4,
    quantize_nvfp4,
)
from megatron_averis.numerics.hadamard import blockwise_rht
from megatron_averis.numerics.random import StepSeed


class StatsReducer(Protocol):
    """How an operand's statistics are combined across the ranks holding parts of it."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks (for column sums and token counts)."""

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over ranks (for amax)."""


class LocalReducer:
    """Single device: the local statistics are the global ones."""

    def sum(self, t):
        return t

    def max(self, t):
        return t


LOCAL = LocalReducer()

# What a caller keeps of an FP4 operand (quantize_operand's `output`). Where the kernels run,
# "values" and "both" make the quantize kernel write the BF16 GEMM operand (code × block scale)
# in the same pass, so no dequantize kernel reads the codes again; "values" also skips the
# packed payload, which only an operand that is saved for backward or communicated needs.
OUTPUTS = ("payload", "values", "both")
_KERNEL_OUTPUTS = {"payload": dict(values=None, payload=True),
                   "values": dict(values=torch.bfloat16, payload=False),
                   "both": dict(values=torch.bfloat16, payload=True)}


@dataclass
class QuantizedOperand:
    """One GEMM operand [rows, K], ready for the emulated FP4 GEMM.

    Exactly one of `qt` (FP4 codes + block scales + tensor scale) and `bf16` (an unquantized
    operand) is set. `mean` is μ̂ in its storage format (FP32 / BF16 tensor or an NVFP4
    QuantizedTensor of shape [1, n]); `signs` is the RHT sign vector when rotated. `amax` is the
    (group-wide) amax of the quantized residual, kept so that the other operand of the same
    tensor (fprop X and wgrad Xᵀ) can reuse it instead of reading the tensor again.
    """

    shape: tuple[int, int]
    qt: QuantizedTensor | None = None
    bf16: torch.Tensor | None = None
    mean: torch.Tensor | QuantizedTensor | None = None
    mean_dim: int | None = None
    signs: torch.Tensor | None = None
    transposed: bool = False
    amax: torch.Tensor | None = None
    # FP32 factor of a `bf16` operand that holds scaled FP4 values read in the other orientation
    # (reoriented()); None for a plain BF16 operand.
    bf16_scale: torch.Tensor | None = None
    # values() and mean_fp32() are read by several GEMM terms: computed once (launches, not math).
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def fmt(self) -> str:
        return self.qt.fmt if self.qt is not None else "bf16"

    def values(self) -> torch.Tensor:
        """The BF16 GEMM operand: FP4 code × block scale, exact in BF16 (tensor scale factored out)."""
        if self.qt is None:
            return self.bf16
        if "values" not in self._cache:
            self._cache["values"] = self.qt.scaled_values(torch.bfloat16)
        return self._cache["values"]

    def scale(self) -> torch.Tensor:
        """FP32 factor applied to the GEMM result for this operand."""
        if self.qt is not None:
            return self.qt.tensor_scale
        if self.bf16_scale is not None:
            return self.bf16_scale
        return torch.ones((), dtype=torch.float32, device=self.bf16.device)

    def mean_fp32(self) -> torch.Tensor | None:
        if self.mean is None:
            return None
        if "mean" not in self._cache:
            self._cache["mean"] = _as_fp32(self.mean)
        return self._cache["mean"]

    def dequantize(self, unrotate: bool = True) -> torch.Tensor:
        """The represented operand in FP64: R̂ plus the mean term, rotated back when `unrotate`."""
        x = self.qt.dequantize() if self.qt is not None else self.bf16.double() * self.scale().double()
        m = self.mean_fp32()
        if m is not None:
            if self.mean_dim == 0:
                x = x + m.double().view(1, -1)
            else:
                e = ones_along_k(self.shape[1], self.signs, x.device).double()
                x = x + m.double().view(-1, 1) * e.view(1, -1)
        if self.signs is not None and unrotate:
            x = blockwise_rht(x, self.signs, inverse=True).double()
        return x

    def t(self) -> "QuantizedOperand":
        """Transpose a 2-D-block operand (weights) without requantizing."""
        if self.mean is not None or self.signs is not None:
            raise ValueError("only plain (no mean, no RHT) 2-D-block operands can be transposed")
        return QuantizedOperand(
            shape=(self.shape[1], self.shape[0]), qt=self.qt.t(), transposed=not self.transposed
        )

    def reoriented(self) -> "QuantizedOperand":
        """The same quantized tensor as the operand of a GEMM that reduces along its other
        dimension (quantize-once recipes): values, scale and mean are reused, nothing is
        requantized. The blocks then lie across the reduction dimension, which FP4 tensor cores
        cannot consume, so the result is a BF16-valued operand of the emulation only."""
        if self.signs is not None:
            raise ValueError("a rotated operand cannot be reoriented: its rotation runs along K")
        return QuantizedOperand(
            shape=(self.shape[1], self.shape[0]), bf16=self.values().t(), mean=self.mean,
            mean_dim=None if self.mean_dim is None else 1 - self.mean_dim,
            transposed=not self.transposed, bf16_scale=self.scale())

    def payload(self) -> list[torch.Tensor]:
        """The tensors that represent this operand (what a collective moves)."""
        out: list[torch.Tensor] = []
        if self.qt is not None:
            out += self.qt.packed()
        else:
            out.append(self.bf16)
        if isinstance(self.mean, QuantizedTensor):
            out += self.mean.packed()
        elif self.mean is not None:
            out.append(self.mean)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.payload())


def ones_along_k(k: int, signs: torch.Tensor | None, device) -> torch.Tensor:
    """e = Hᵀ·1 (the all-ones vector in the rotated basis); 1 without rotation. Entries are
    multiples of 1/4 in [-4, 4] for 16-blocks, so e is exact in BF16 too."""
    ones = torch.ones(1, k, device=device, dtype=torch.float32)
    return (blockwise_rht(ones, signs) if signs is not None else ones).view(k)


def store_mean(m: torch.Tensor, fmt: str):
    """μ as an operand keeps it: FP32, BF16, or NVFP4-quantized (mean_format)."""
    if fmt == "fp32":
        return m
    if fmt == "bf16":
        return m.to(torch.bfloat16)
    if fmt == "nvfp4":
        return quantize_nvfp4(m.view(1, -1))
    raise ValueError(f"unknown mean format {fmt!r}; use fp32, bf16 or nvfp4")


def _as_fp32(stored) -> torch.Tensor:
    """A stored mean as the FP32 vector that the split subtracts and the GEMM terms use."""
    if isinstance(stored, QuantizedTensor):
        return stored.dequantize(torch.float32).reshape(-1)
    return stored.float()


def pairwise_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """FP32 sums over `dim` by a pairwise tree: zero-pad to a power of two, then add adjacent
    pairs level by level (explicit additions: no accumulator starting at +0.0)."""
    x = x.float().movedim(dim, 0)
    n = x.shape[0]
    p = 1 << max(n - 1, 0).bit_length()
    if p > n:
        x = torch.cat([x, x.new_zeros((p - n,) + tuple(x.shape[1:]))])
    while x.shape[0] > 1:
        x = x[0::2] + x[1::2]
    return x[0]


def token_mean(
    x: torch.Tensor, dim: int, reducer: StatsReducer = LOCAL, with_range: bool = False,
    token_sum: str = "pairwise",
):
    """FP32 mean of x over `dim`, with sums and counts combined over ranks in one collective.

    token_sum: the order of the sums (backend.TOKEN_SUMS): "pairwise" (pairwise_sum; the GPU
    stats kernel reproduces it bit for bit) or "torch" (x.sum in FP32, torch's order).
    with_range: also return the local per-feature (min, max) of x over `dim` when the GPU stats
    kernel produced them in the same pass (else None); quantize_operand derives the residual's
    amax from it instead of reading x again."""
    backend.check_choice("token_sum", token_sum)
    rng = None
    if token_sum == "torch":
        sums = x.sum(dim=dim, dtype=torch.float32)  # FP32 accumulation without an FP32 copy
    elif (fp4 := backend.operand_kernels(x)) is not None:
        sums, rng = fp4.token_stats(x, dim)
    else:
        sums = pairwise_sum(x, dim)
    if reducer is LOCAL:
        # Divide by a device tensor as the distributed branch does: a Python-scalar divisor may
        # become a multiplication by its reciprocal on CUDA (other bits, TP≠1 numerics).
        mean = sums / sums.new_full((), float(x.shape[dim]))
    else:
        stats = reducer.sum(torch.cat([sums, sums.new_full((1,), float(x.shape[dim]))]))
        mean = stats[:-1] / stats[-1]
    return (mean, rng) if with_range else mean


def range_abs_max(rng: tuple[torch.Tensor, torch.Tensor], sub: torch.Tensor) -> torch.Tensor:
    """max |x - sub| from the per-feature (min, max) of x: x ↦ fl(x - m) is monotone, so the
    extremes of the residual are fl(min - m) and fl(max - m); equal to abs_max(x, sub)."""
    lo, hi = rng
    m = sub.reshape(-1)
    if (fp4 := backend.range_kernels(lo)) is not None:
        return fp4.range_amax(lo, hi, m)
    return torch.maximum((hi - m).abs(), (lo - m).abs()).amax()


def quantize_operand(
    x: torch.Tensor,
    fmt: str,
    *,
    block: tuple[int, int] = (1, 16),
    rounding: str = "rne",
    mean_dim: int | None = None,
    mean_format: str = "bf16",
    signs: torch.Tensor | None = None,
    sr_seed: int | StepSeed | None = None,
    rng_offset: tuple[int, int] = (0, 0),
    reducer: StatsReducer = LOCAL,
    transposed: bool = False,
    mean: torch.Tensor | QuantizedTensor | None = None,
    amax: torch.Tensor | None = None,
    token_sum: str = "pairwise",
    output: str = "payload",
    mean_fp32: torch.Tensor | None = None,
) -> QuantizedOperand:
    """Build a GEMM operand from x [rows, K] (blocks along K).

    fmt: bf16 | nvfp4 | mxfp4. mean_dim: None (no split), 0 or 1 (see the module docstring).
    `rng_offset` is x's position inside the full (unsharded) operand. `mean` passes a stored
    mean computed for another operand of the same tensor (fprop's μ of X is wgrad's μ of Xᵀ when
    neither is rotated along it), saving a reduction. `amax` likewise passes the (group-wide)
    NVFP4 residual amax of that operand: with the same mean and no rotation both operands
    quantize the same residual, only transposed. `token_sum` orders the sums behind the mean
    (token_mean; the recipe's token_sum field). `output` (OUTPUTS): what the caller keeps:
    the packed payload ("payload": saved or communicated), the BF16 GEMM operand written in the
    quantize pass ("values": consumed right away by a GEMM), or both. `mean_fp32`: the FP32 form
    of a passed `mean` (that operand's mean_fp32()), so it is not converted again.
    """
    if x.dim() != 2:
        raise ValueError(f"a GEMM operand must be 2-D [rows, K], got shape {tuple(x.shape)}")
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r} is unknown; choose one of {OUTPUTS}")
    backend.check_choice("token_sum", token_sum)
    if fmt == "bf16":
        if mean_dim is not None or signs is not None:
            raise ValueError("mean split and RHT apply only to FP4 operands")
        return QuantizedOperand(tuple(x.shape), bf16=x.to(torch.bfloat16), transposed=transposed)
    if mean_dim not in (None, 0, 1):
        raise ValueError(f"mean_dim must be None, 0 or 1, got {mean_dim}")

    if mean is not None and (mean_dim is None or (mean_dim == 0 and signs is not None)):
        raise ValueError("a precomputed mean needs a mean split without rotation along the mean")
    if mean_fp32 is not None and mean is None:
        raise ValueError("mean_fp32 is the FP32 form of a passed mean: pass the mean too")
    if amax is not None and (signs is not None or fmt != "nvfp4"):
        raise ValueError("a precomputed amax applies only to unrotated NVFP4 operands")
    # The quantizers take the FP32 residual as (r, sub, rot): blockwise_rht(r.float() - sub, rot)
    # is computed inside them (in registers by the GPU kernels), so neither R = X - μ̂ nor its
    # rotation is materialized. Without the kernels the rotation is applied here, once, instead.
    r, sub, rng, rot = x, None, None, None
    fused_rht = signs is not None and backend.operand_kernels(x, signs) is not None
    if mean_dim is not None:
        if mean_dim == 0 and signs is not None:
            # μ is the mean of the rotated operand (token_mean reads it), so it is materialized.
            r = blockwise_rht(r.float(), signs)
        if mean is None:
            m, rng = token_mean(r, mean_dim, reducer, with_range=True, token_sum=token_sum)
            mean = store_mean(m, mean_format)
        if mean_fp32 is None:
            mean_fp32 = _as_fp32(mean)
        sub = mean_fp32.view((1, -1) if mean_dim == 0 else (-1, 1))
        if mean_dim == 1 and signs is not None:
            rng = None  # the range of x bounds x - μ̂, not its rotation
            if fused_rht:
                rot = signs
            else:
                r, sub = blockwise_rht(r.float() - sub, signs), None
    elif fused_rht:
        rot = signs
    elif signs is not None:
        r = blockwise_rht(r.float(), signs)

    if fmt == "nvfp4":
        if amax is None:
            amax = reducer.max(abs_max(r, sub, rot) if rng is None else range_abs_max(rng, sub))
        qt = quantize_nvfp4(r, block, rounding, sr_seed, rng_offset, amax=amax, subtract=sub,
                            signs=rot, **_KERNEL_OUTPUTS[output])
    elif fmt == "mxfp4":
        if block != (1, 32):
            raise ValueError(f"MXFP4 uses 1x32 blocks, got {block[0]}x{block[1]}")
        qt = quantize_mxfp4(r, rounding, sr_seed, rng_offset, subtract=sub, signs=rot,
                            **_KERNEL_OUTPUTS[output])
    else:
        raise ValueError(f"unknown operand format {fmt!r}; use bf16, nvfp4 or mxfp4")
    op = QuantizedOperand(tuple(x.shape), qt=qt, mean=mean, mean_dim=mean_dim, signs=signs,
                          transposed=transposed, amax=amax if fmt == "nvfp4" else None)
    if mean_fp32 is not None:  # what mean_fp32() returns, converted once above
        op._cache["mean"] = mean_fp32.reshape(-1)
    return op
