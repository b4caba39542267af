"""Emulated FP4 GEMM: what an FP4 tensor-core GEMM with FP32 accumulation computes, plus the
Averis rank-one terms.

C = A·Bᵀ for operands A [M, K], B [N, K] (see operand.py). Each operand is sA·Â (+ mean term),
where Â = code × block scale is exact in BF16 (a 2-bit E2M1 significand times an E4M3 or E8M0
scale fits BF16's 8 bits). So one BF16 GEMM of Â and B̂ with FP32 accumulation and FP32 output,
scaled by sA·sB in FP32, is what an NVFP4 tensor core computes. The means are never added back
into a BF16 operand (that would round); their terms are added in FP32:

    A = U_A + R_A,  B = U_B + R_B,   A·Bᵀ = R_A·R_Bᵀ + R_A·U_Bᵀ + U_A·R_Bᵀ + U_A·U_Bᵀ

with U = 1·μᵀ (mean_dim 0) or U = μ·eᵀ (mean_dim 1; e = Hᵀ·1, the ones vector, rotated under RHT):

    R_A·U_Bᵀ  = (R_A·μ_B)·1ᵀ                 B mean_dim 0
              = (R_A·e)·μ_Bᵀ                 B mean_dim 1
    U_A·R_Bᵀ  = 1·(R_B·μ_A)ᵀ                 A mean_dim 0
              = μ_A·(R_B·e)ᵀ                 A mean_dim 1
    U_A·U_Bᵀ  = (μ_A·μ_B)·1·1ᵀ               0/0
              = (μ_A·e)·1·μ_Bᵀ               0/1
              = (e·μ_B)·μ_A·1ᵀ               1/0
              = K·μ_A·μ_Bᵀ                   1/1  (e·e = K, H orthogonal)

When both operands carry a mean along the reduction dimension (wgrad with both split) the cross
terms are dropped: R·e = 0 holds exactly for the unquantized residual, so (R̂·e) is pure
quantization error, and omitting it gives dW = R̂_G·R̂_Xᵀ + T·μ_G·μ_Xᵀ, the exact rank-one
restoration of the paper. In fprop/dgrad only the weight-side GEMV (Ŵ·μ) is needed: a vector,
not a second GEMM. `cross_terms=True` keeps them: the product of the whole reconstructed operands
(μ + R̂), as quantize-once recipes compute wgrad from the X̂ and Ĝ of fprop and dgrad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_averis.numerics import backend
from megatron_averis.numerics.operand import QuantizedOperand, ones_along_k

_MM_OUT_DTYPE_OK: dict[str, bool] = {}


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·bᵀ for BF16 a [M, K], b [N, K] with FP32 accumulation and an FP32 result.

    On CUDA, torch.mm(out_dtype=float32) keeps BF16 tensor-core speed without rounding the result
    to BF16. Elsewhere the FP32 product of the BF16 values is used: each elementwise product is
    exact in FP32 and the sum accumulates in FP32, the same arithmetic.
    """
    dev = a.device.type
    if dev == "cuda" and _MM_OUT_DTYPE_OK.get(dev, True):
        try:
            return torch.mm(a, b.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE_OK[dev] = False
    with _no_tf32():
        # Dense copies: a CPU BLAS sums in an order that depends on the operands' layout, and a
        # transposed view (dgrad's 16x16 Wᵀ) must give the bits of its contiguous equal.
        return torch.mm(a.float().contiguous(), b.float().contiguous().t())


class _no_tf32:
    """FP32 matmuls must not silently drop to TF32 (10-bit inputs) on Ampere+ GPUs."""

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


@dataclass
class MeanTerm:
    """One FP32 term qgemm adds to the scaled product: a row vector u (broadcast along N), a
    column vector v (along M), their outer product u·vᵀ (times the integer k if set), or a scalar.
    Terms are data so that one pass (or the fused GEMM's epilogue) adds them all, in order."""

    row: torch.Tensor | None = None  # [M]
    col: torch.Tensor | None = None  # [N]
    k: int | None = None
    scalar: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        if self.scalar is not None:
            return self.scalar
        if self.row is not None and self.col is not None:
            o = torch.outer(self.row, self.col)
            return o if self.k is None else self.k * o
        return self.row.view(-1, 1) if self.row is not None else self.col.view(1, -1)

    def fields(self) -> tuple:
        """(row, col, k, scalar): the plain form the kernels take."""
        return self.row, self.col, self.k, self.scalar


def _product_plus_terms(a: QuantizedOperand, b: QuantizedOperand, terms: list[MeanTerm],
                        out_dtype: torch.dtype, product=None, fp4_gemm: str = "dequant",
                        accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """(Â·B̂ᵀ)·(s_A·s_B) + Σ terms in FP32, rounded once to `out_dtype`. On CUDA the scale, the
    terms and the rounding are one kernel pass over the product (same FP32 operations, same
    order); with fp4_gemm="fused" a Triton GEMM reads the packed FP4 operands and applies them in
    its epilogue. `product(a, b)`, when given, supplies the FP32 Â·B̂ᵀ instead (Transformer
    Engine's native NVFP4 GEMM on Blackwell: megatron_averis.te.native)."""
    scale = a.scale() * b.scale()
    fp4 = (backend.fused_gemm_kernels(a.qt, b.qt, len(terms), fp4_gemm)
           if product is None and a.qt is not None and b.qt is not None else None)
    if fp4 is not None:
        out = fp4.scaled_mm(a.qt.data, a.qt.block_scales, a.qt.block, b.qt.data,
                            b.qt.block_scales, b.qt.block, a.qt.fmt, scale,
                            [t.fields() for t in terms])
        return out.to(out_dtype) if accumulate is None else accumulate.add_(out)
    out = mm_fp32(a.values(), b.values()) if product is None else product(a, b)
    fp4 = backend.epilogue_kernels(out, len(terms))
    if fp4 is not None:
        return fp4.scale_and_add_terms(out, scale, [t.fields() for t in terms], out_dtype,
                                       accumulate)
    out = out * scale
    for term in terms:
        out += term.dense()
    return out.to(out_dtype) if accumulate is None else accumulate.add_(out)


def _rowwise_dot(op: QuantizedOperand, v: torch.Tensor,
                 v_bf16: torch.Tensor | None = None) -> torch.Tensor:
    """R̂·v in FP32 for an operand's residual (K-indexed v): one GEMV. When v is exact in BF16
    (`v_bf16`: a BF16-stored μ̂, or e) the GEMV reads the operand's BF16 values as they are, with
    FP32 accumulation: the products are exact in FP32 either way, and no FP32 copy of the
    operand (a weight-sized cast per GEMM) is made."""
    if v_bf16 is not None:
        return mm_fp32(op.values(), v_bf16.view(1, -1)).view(-1) * op.scale()
    return (op.values().float() @ v) * op.scale()


def _bf16_mean(op: QuantizedOperand) -> torch.Tensor | None:
    """The operand's μ̂ when it is stored in BF16 (mean_format="bf16"), else None."""
    m = op.mean
    return m if isinstance(m, torch.Tensor) and m.dtype == torch.bfloat16 else None


def qgemm(a: QuantizedOperand, b: QuantizedOperand, bias: torch.Tensor | None = None,
          out_dtype: torch.dtype = torch.float32, product=None,
          cross_terms: bool = False, fp4_gemm: str = "dequant",
          accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N] = A·Bᵀ (+ bias along N) as the FP4 hardware computes it, with exact Averis
    rank-one terms, in FP32 and then rounded once to `out_dtype`. fp4_gemm (the recipe's field,
    backend.FP4_GEMMS): "dequant" (BF16 scaled values, then cuBLAS) or "fused" (a Triton GEMM
    on the packed codes where the kernels run: FP32 sums in another order, other last bits);
    "auto" is "dequant" here and "native" needs the tensor-core `product` of the Transformer
    Engine route (te/native.py). `accumulate`: a contiguous FP32 [M, N] tensor (wgrad's
    main_grad) that the FP32 result is added into in place, in the epilogue where the kernels
    run: the bits of accumulate.add_(qgemm(...)), without writing the product out first."""
    backend.check_choice("fp4_gemm", fp4_gemm)
    if accumulate is not None and (accumulate.dtype != torch.float32
                                   or not accumulate.is_contiguous()
                                   or tuple(accumulate.shape) != (a.shape[0], b.shape[0])):
        raise ValueError(f"accumulate must be a contiguous FP32 [{a.shape[0]}, {b.shape[0]}] "
                         f"tensor, got {accumulate.dtype} {tuple(accumulate.shape)}")
    if fp4_gemm == "native" and product is None:
        raise ValueError("fp4_gemm='native': the FP4 tensor-core product comes from the Transformer "
                         "Engine route on sm_100+ (te/native.py), and this GEMM has none; use "
                         "fp4_gemm='auto' or 'dequant'")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"reduction dimensions differ: A {a.shape}, B {b.shape}")
    if (a.signs is None) != (b.signs is None) or (
        a.signs is not None and a.signs is not b.signs
        and not torch.equal(a.signs.cpu(), b.signs.cpu())
    ):
        raise ValueError("both operands of a GEMM must use the same Hadamard transform (or none)")
    ma, mb = a.mean_fp32(), b.mean_fp32()
    terms: list[MeanTerm] = []
    bias_terms = [MeanTerm(col=bias.float())] if bias is not None else []  # added last
    if ma is None and mb is None:
        return _product_plus_terms(a, b, bias_terms, out_dtype, product, fp4_gemm, accumulate)
    k = a.shape[1]
    device = ma.device if ma is not None else mb.device
    ones = {}

    def e():  # Hᵀ·1, built only when a mean lies along the reduction dimension
        if "e" not in ones:
            ones["e"] = ones_along_k(k, a.signs, device)
        return ones["e"]

    def e_bf16():  # e's entries are multiples of 1/4 in [-4, 4]: exact in BF16
        if "e_bf16" not in ones:
            ones["e_bf16"] = e().to(torch.bfloat16)
        return ones["e_bf16"]

    both_reduction = a.mean_dim == 1 and b.mean_dim == 1 and not cross_terms
    if mb is not None and not both_reduction:
        if b.mean_dim == 0:
            terms.append(MeanTerm(row=_rowwise_dot(a, mb, _bf16_mean(b))))
        else:
            terms.append(MeanTerm(row=_rowwise_dot(a, e(), e_bf16()), col=mb))
    if ma is not None and not both_reduction:
        if a.mean_dim == 0:
            terms.append(MeanTerm(col=_rowwise_dot(b, ma, _bf16_mean(a))))
        else:
            terms.append(MeanTerm(row=ma, col=_rowwise_dot(b, e(), e_bf16())))
    if ma is not None and mb is not None:
        if a.mean_dim == 0 and b.mean_dim == 0:
            terms.append(MeanTerm(scalar=torch.dot(ma, mb)))
        elif a.mean_dim == 0:
            terms.append(MeanTerm(col=torch.dot(ma, e()) * mb))
        elif b.mean_dim == 0:
            terms.append(MeanTerm(row=torch.dot(e(), mb) * ma))
        else:
            terms.append(MeanTerm(row=ma, col=mb, k=k))
    return _product_plus_terms(a, b, terms + bias_terms, out_dtype, product, fp4_gemm,
                               accumulate)
