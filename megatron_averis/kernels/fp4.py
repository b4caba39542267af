"""Fused FP4 quantization, residual amax and dequantization in Triton (see kernels/__init__.py).

Each kernel follows numerics.blockscale / numerics.e2m1 / numerics.random step by step in FP32 with
the same roundings, so codes, scales and tensor scales are bit-identical to the reference:

- Every amax is a maximum of |x| bit patterns as int32: for non-negative floats integer order is
  float order and NaN patterns sort above inf, so a NaN propagates as in torch.amax. A maximum does
  not depend on the order it is taken in, so tiles, atomics and layouts cannot change it.
- Divisions that the reference performs tensor by tensor use div_rn: Triton's `/` on FP32 is an
  approximate division.
- E4M3 rounding is done on the FP32 bit pattern (RNE to 3 mantissa bits, subnormals on the 2^-9
  grid). Triton's interpreter rounds fp32->float8e4nv wrongly when rounding carries into the next
  binade, and this keeps the interpreter and the GPU on one code path.
- MXFP4 divides by a power of two; multiplying by its exact reciprocal rounds identically.
- FMA contraction is disabled (enable_fp_fusion=False) so every product is rounded before it is
  added, as in the reference's separate PyTorch ops.
- Stochastic rounding re-implements random.position_uniform (MurmurHash3's finalizer on uint32,
  which wraps exactly like the reference's masked int64 arithmetic) and e2m1._stochastic_index.

Operands are [R, C] views with arbitrary strides, blocks along C: a wgrad operand Xᵀ is quantized
by reading X [T, K] with swapped strides, without a transposed copy. `sub` (FP32, [1, C] or [R, 1])
is subtracted in registers: the Averis residual R = X - μ̂ is never materialized. The 16x16
random Hadamard transform of (x - sub) is applied in registers too (RHT, NEG): sign flips, the
fast Walsh-Hadamard butterfly and the 1/4 scale in hadamard.blockwise_rht's FP32 order.

The quantize kernel can also write the GEMM operand, code × block scale, from the codes and
scale bytes it has just computed (decoded by _block_values, the dequantize kernel's function), and
skip the packed payload when only that operand is needed.

The host functions take and return plain tensors; numerics (blockscale, operand, qgemm) wraps
them in its types and numerics.backend decides when they run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_averis import formats
from megatron_averis.formats import MXFP4_BLOCK, RHT_BLOCK
from megatron_averis.kernels import DEQUANTIZE_DTYPES, interpreting

FLT_MAX = tl.constexpr(formats.FLT_MAX)
E2M1_MAX = tl.constexpr(formats.E2M1_MAX)
# float32(1/6): the reference multiplies S_enc by the Python scalar 1/6, which torch rounds to FP32.
ONE_SIXTH_F32 = tl.constexpr(torch.tensor(1.0 / formats.E2M1_MAX, dtype=torch.float32).item())
E4M3_MAX = tl.constexpr(formats.E4M3_MAX)
S_ENC_NUMERATOR = tl.constexpr(formats.E4M3_MAX * formats.E2M1_MAX)  # 2688: S_enc = 2688 / amax
FMIX32_MUL1 = tl.constexpr(formats.FMIX32_MUL1)
FMIX32_MUL2 = tl.constexpr(formats.FMIX32_MUL2)
SR_ROW_MUL = tl.constexpr(formats.SR_ROW_MUL)
SR_COL_MUL = tl.constexpr(formats.SR_COL_MUL)
SEED_MIX_MUL = tl.constexpr(formats.SEED_MIX_MUL)
E4M3_MIN_NORMAL = tl.constexpr(0.015625)  # 2^-6
TWO_POW_23 = tl.constexpr(8388608.0)


@triton.jit
def _fmix32(h):
    # MurmurHash3 finalizer on uint32 (random.fmix32): uint32 products wrap mod 2^32.
    h ^= h >> 16
    h *= FMIX32_MUL1
    h ^= h >> 13
    h *= FMIX32_MUL2
    h ^= h >> 16
    return h


@triton.jit
def _load_operand(x_ptr, sx_r, sx_c, sub_ptr, r, c, R, C, SUB_DIM: tl.constexpr,
                  RHT: tl.constexpr, NEG: tl.constexpr):
    """FP32 x[r, c] - sub, and 0 outside the tensor (r, c: broadcastable int64 indices). With RHT
    the sign flips of hadamard.blockwise_rht are applied too (NEG: bit j set where s_j = -1);
    the caller runs the butterfly (_rht_butterfly) once the tile has its final shape."""
    mask = (r < R) & (c < C)
    x = tl.load(x_ptr + r * sx_r + c * sx_c, mask=mask, other=0.0).to(tl.float32)
    if SUB_DIM == 0:
        x = x - tl.load(sub_ptr + c, mask=c < C, other=0.0)
    elif SUB_DIM == 1:
        x = x - tl.load(sub_ptr + r, mask=r < R, other=0.0)
    if SUB_DIM >= 0:
        x = tl.where(mask, x, 0.0)  # padding is 0 - sub after the subtraction
    if RHT:
        # (padding may become -0.0 here: only its |x| reaches a block maximum, never a code)
        neg = (tl.full([], NEG, tl.int64) >> (c % 16)) & 1
        x = x * tl.where(neg != 0, -1.0, 1.0)
    return x


@triton.jit
def _rht_butterfly(x, N: tl.constexpr):
    """hadamard._butterfly on x viewed as [N, 16] (16-blocks of contiguous tile columns; C is a
    multiple of 16, so a block is entirely inside or outside the tensor), then the exact 1/4: the
    reference's FP32 operations in its order. Returns the [N, 16] result."""
    v = tl.reshape(x, [N, 16])
    v = _butterfly_stage(v, N, 1)
    v = _butterfly_stage(v, N, 2)
    v = _butterfly_stage(v, N, 4)
    v = _butterfly_stage(v, N, 8)
    return v * 0.25


@triton.jit
def _butterfly_stage(v, N: tl.constexpr, H: tl.constexpr):
    """(a, b) -> (a + b, a - b) for the pairs (j, j + H) of each 16-block of v [N, 16]: index
    j = g·2H + t·H + u, so the pair member t becomes the last (size-2) axis for split / join."""
    a, b = tl.split(tl.permute(tl.reshape(v, [N, 8 // H, 2, H]), (0, 1, 3, 2)))
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [N, 16])


@triton.jit
def _abs_bits(x):
    return (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)


@triton.jit
def _amax_kernel(x_ptr, sx_r, sx_c, sub_ptr, out_ptr, R, C,
                 BR: tl.constexpr, BC: tl.constexpr, SUB_DIM: tl.constexpr,
                 RHT: tl.constexpr, NEG: tl.constexpr):
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None]
    c = (tl.program_id(1) * BC + tl.arange(0, BC)).to(tl.int64)[None, :]
    x = _load_operand(x_ptr, sx_r, sx_c, sub_ptr, r, c, R, C, SUB_DIM, RHT, NEG)
    if RHT:
        x = _rht_butterfly(x, BR * BC // 16)
    bits = _abs_bits(x)
    tl.atomic_max(out_ptr, tl.max(tl.max(bits, axis=1), axis=0))


@triton.jit
def _e4m3_rne(v):
    """(E4M3 code, its FP32 value) for v in [0, 448] or NaN, rounded to nearest even."""
    b = v.to(tl.uint32, bitcast=True)
    rn = (b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000  # RNE to 3 mantissa bits (normal range)
    normal = (((rn >> 23) - 120) << 3) | ((rn >> 20) & 7)
    # Subnormal E4M3 (below 2^-6) sits on the 2^-9 grid: v·512 is exact and adding 2^23 rounds
    # it to an integer with RNE; 8 (a carry) is the code of 2^-6 itself.
    q = (v * 512.0 + TWO_POW_23) - TWO_POW_23
    tiny = v < E4M3_MIN_NORMAL
    code = tl.where(tiny, q.to(tl.uint32), normal)
    value = tl.where(tiny, q * 0.001953125, rn.to(tl.float32, bitcast=True))
    is_nan = v != v
    return tl.where(is_nan, 0x7F, code), tl.where(is_nan, v, value)


@triton.jit
def _encode_e2m1(y, r, c, R, C, keyu, off_r, off_c, ridx_ptr, cidx_ptr, SR: tl.constexpr,
                 ROW_IDX: tl.constexpr, COL_IDX: tl.constexpr):
    """E2M1 codes of scaled values y (e2m1.encode_e2m1). For SR, the local indices r, c map to
    global positions as in random.position_uniform: offset + index, or an index tensor; keyu is
    the uint32 key (random.seed_key).

    The magnitude index comes from the FP32 bit pattern instead of the reference's seven
    comparisons (the same result for every input, with a third of the instructions): from 1 up,
    E2M1 is FP32 with one mantissa bit, and bits >> 22 is 2·exponent + that bit, i.e. index + 252
    (1.0 -> 2, 1.5 -> 3, ..., 6.0 -> 7); below 1 the grid is {0, 0.5} plus the carry to 1.0."""
    a = _abs_bits(y).to(tl.float32, bitcast=True)
    neg = (y < 0.0).to(tl.int32)
    if SR:
        a = tl.where(a > E2M1_MAX, E2M1_MAX, a)  # keeps NaN, like torch.clamp
        b = a.to(tl.int32, bitcast=True)
        # lo: the largest grid value <= a; p_up = (a - lo) / gap, the reference's exact quotient
        # (both operations are exact). For a >= 1 the gap is half the binade and (a - lo) / gap is
        # the 22 mantissa bits below the kept one, times 2^-22 (0 at 6.0, where the gap is 1);
        # below 1, grid {0, 0.5}, gap 0.5: 2a - lo. NaN: lo = 0, p_up = NaN, never rounds up.
        big = a >= 1.0
        half = a >= 0.5
        lo = tl.where(big, (b >> 22) - 252, half.to(tl.int32))
        p_up = tl.where(big, (b & 0x3FFFFF).to(tl.float32) * 2.384185791015625e-07,  # 2^-22
                        a * 2.0 - half.to(tl.float32))
        gr = _global_index(r, R, off_r, ridx_ptr, ROW_IDX)
        gc = _global_index(c, C, off_c, cidx_ptr, COL_IDX)
        hr = _fmix32(gr.to(tl.uint32) * SR_ROW_MUL + keyu)
        h = _fmix32((hr ^ (gc.to(tl.uint32) * SR_COL_MUL)) ^ keyu)
        u = (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 24 random bits · 2^-24
        idx = lo + (u < p_up).to(tl.int32)
    else:
        # Round to nearest, ties to the even code (e2m1._RNE_STEPS). a >= 1: RNE of the bit
        # pattern to one mantissa bit, saturated at index 7 (6.0; inf too). a < 1: 2a is exact
        # and adding 2^23 rounds it to an integer with ties to even (0.25 -> 0, 0.75 -> 2).
        # NaN fails both tests and gets index 0, as the reference's comparisons give.
        b = a.to(tl.int32, bitcast=True)
        rn = (b + 0x1FFFFF + ((b >> 22) & 1)) >> 22
        small = ((a * 2.0 + TWO_POW_23).to(tl.int32, bitcast=True) - 0x4B000000)
        idx = tl.where(a >= 1.0, tl.minimum(rn - 252, 7), tl.where(a < 1.0, small, 0))
    return idx | (neg << 3)


@triton.jit
def _global_index(local, n, off, idx_ptr, FROM_TENSOR: tl.constexpr):
    """Global positions of local indices: off + local, or idx[local] (an index tensor)."""
    if FROM_TENSOR:
        return tl.load(idx_ptr + local, mask=local < n, other=0)
    return off + local


@triton.jit
def _seed_key(key, step_ptr, STEP_SEED: tl.constexpr):
    """random.seed_key as uint32: `key` itself, or for a StepSeed (key = its base) the key of
    fold_seed(base, step) with the step read from device memory."""
    k = key.to(tl.uint32, bitcast=True)
    if STEP_SEED:
        step = tl.load(step_ptr).to(tl.uint32)
        k = _fmix32(_fmix32((k ^ step) * SEED_MIX_MUL))
    return k


# Seeds and offsets are not specialized on: a new value must not compile a new kernel. Sizes and
# strides are, as in every kernel here: Triton then knows whether they are multiples of 16 (at
# most a few variants per kernel), which lets masked loads and stores vectorize to 16 bytes;
# without it every element is its own 2-byte load.
@triton.jit(do_not_specialize=["key", "off_r", "off_c"])
def _quantize_kernel(
    x_ptr, sx_r, sx_c, sub_ptr, amax_ptr, q_ptr, s_ptr, ts_ptr, v_ptr,
    R, C, key, step_ptr, off_r, off_c, ridx_ptr, cidx_ptr,
    BR: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
    MX: tl.constexpr, SR: tl.constexpr, STEP_SEED: tl.constexpr, SUB_DIM: tl.constexpr,
    ROW_IDX: tl.constexpr, COL_IDX: tl.constexpr, RHT: tl.constexpr, NEG: tl.constexpr,
    PAYLOAD: tl.constexpr, VALUES: tl.constexpr,
):
    """PAYLOAD: store the packed codes and block scales. VALUES: store code × block scale
    (what _dequant_kernel would make of them) to v_ptr [R, C], contiguous, in its dtype."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    blks = pid_c * NB + tl.arange(0, NB)
    r3 = rows.to(tl.int64)[:, None, None]
    c3 = (blks[:, None] * BK + tl.arange(0, BK)[None, :]).to(tl.int64)[None, :, :]
    x = _load_operand(x_ptr, sx_r, sx_c, sub_ptr, r3, c3, R, C, SUB_DIM, RHT, NEG)  # [BR, NB, BK]
    if RHT:
        x = tl.reshape(_rht_butterfly(x, BR * NB * BK // 16), [BR, NB, BK])

    bmax = tl.max(_abs_bits(x), axis=2)  # [BR, NB]
    if BM > 1:
        bmax = tl.max(tl.reshape(bmax, [BR // BM, BM, NB]), axis=1)  # [BR/BM, NB]

    if MX:
        # blockscale.quantize_mxfp4: exponent floor(log2 amax) - 2 from the FP32 exponent field,
        # clamped to [-127, 127]; zero / subnormal amax -> 2^-127. torch.frexp gives exponent 0
        # for inf (scale 2^-3), and NaN fails `amax > 0` (scale 2^-127); both store 0xFF.
        biased = (bmax >> 23) & 0xFF
        is_nan = bmax > 0x7F800000
        is_inf = bmax == 0x7F800000
        e8 = tl.maximum(biased - 2, 0)
        e8 = tl.where(is_inf, 124, e8)
        e8 = tl.where(is_nan, 0, e8)
        stored = tl.where(is_nan | is_inf, 255, e8)
        mult = ((254 - e8) << 23).to(tl.float32, bitcast=True)  # 2^(127 - e8), exact
        if (pid_r == 0) & (pid_c == 0):
            tl.store(ts_ptr, 1.0)
    else:
        # blockscale.nvfp4_tensor_scales
        amax = tl.load(amax_ptr)
        s_enc = tl.math.div_rn(tl.full([], S_ENC_NUMERATOR, tl.float32), amax)
        s_enc = tl.where(s_enc > FLT_MAX, FLT_MAX, s_enc)
        s_enc = tl.where(s_enc == 0.0, 1.0, s_enc)
        s_dec = tl.math.div_rn(tl.full([], 1.0, tl.float32), s_enc)
        s_dec = tl.where(_abs_bits(amax) < 0x7F800000, s_dec, float("nan"))
        if (pid_r == 0) & (pid_c == 0):
            tl.store(ts_ptr, s_dec)
        # block scale: E4M3(min(block_amax · (S_enc · 1/6), 448)), then 1 / (s_blk · s_dec)
        v = bmax.to(tl.float32, bitcast=True) * (s_enc * ONE_SIXTH_F32)
        v = tl.where(v > FLT_MAX, FLT_MAX, v)
        v = tl.where(v > E4M3_MAX, E4M3_MAX, v)
        stored, s_blk = _e4m3_rne(v)
        mult = tl.math.div_rn(tl.full(s_blk.shape, 1.0, tl.float32), s_blk * s_dec)
        mult = tl.where(mult > FLT_MAX, FLT_MAX, mult)
    if BM > 1:
        mult = _rows_of_blocks(mult, BR, BM, NB)

    keyu = _seed_key(key, step_ptr, STEP_SEED)
    codes = _encode_e2m1(x * tl.expand_dims(mult, 2), r3, c3, R, C, keyu, off_r, off_c,
                         ridx_ptr, cidx_ptr, SR, ROW_IDX, COL_IDX)
    if PAYLOAD:
        lo, hi = tl.split(tl.reshape(codes, [BR, NB, BK // 2, 2]))
        half_c = C // 2
        qc = (blks[:, None] * (BK // 2) + tl.arange(0, BK // 2)[None, :]).to(tl.int64)[None, :, :]
        tl.store(q_ptr + r3 * half_c + qc, (lo | (hi << 4)).to(tl.uint8),
                 mask=(r3 < R) & (qc < half_c))
        n_sc = C // BK
        srows = (pid_r * (BR // BM) + tl.arange(0, BR // BM)).to(tl.int64)[:, None]
        sc = blks[None, :]
        tl.store(s_ptr + srows * n_sc + sc, stored.to(tl.uint8),
                 mask=(srows < R // BM) & (sc < n_sc))
    if VALUES:
        # Decoded from the very byte the payload stores, as _dequant_kernel decodes it.
        s = stored.to(tl.uint8).to(tl.int32)
        if BM > 1:
            s = _rows_of_blocks(s, BR, BM, NB)
        tl.store(v_ptr + r3 * C + c3, _block_values(codes, s, MX).to(v_ptr.dtype.element_ty),
                 mask=(r3 < R) & (c3 < C))


@triton.jit
def _rows_of_blocks(t, BR: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr):
    """Per-block values [BR/BM, NB] repeated for each of their block's BM rows: [BR, NB]."""
    return tl.reshape(tl.broadcast_to(tl.expand_dims(t, 1), [BR // BM, BM, NB]), [BR, NB])


@triton.jit
def _block_values(codes, s, MX: tl.constexpr):
    """FP32 code × block scale for codes [BR, NB, BK] and their stored scales [BR, NB] (int32
    holding the byte): the GEMM operand, exact in BF16 (QuantizedTensor.scaled_values)."""
    return _e2m1_value(codes) * tl.expand_dims(_scale_value(s, MX), 2)


@triton.jit
def _e2m1_value(codes):
    """FP32 value of E2M1 codes (e2m1.decode_e2m1)."""
    i = codes & 7
    mag = tl.where(i < 4, i.to(tl.float32) * 0.5,
                   tl.where(i < 6, (i - 2).to(tl.float32), ((i - 4) * 2).to(tl.float32)))
    # the sign goes in as a bit: Triton's unary minus is 0 - x, which turns code 8 (-0.0) into +0.0
    return (mag.to(tl.int32, bitcast=True) | ((codes & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _scale_value(s, MX: tl.constexpr):
    """FP32 value of stored block scales (int32 holding the byte): E8M0 or E4M3, exact."""
    if MX:  # blockscale.e8m0_to_fp32
        scale = tl.where(s > 0, s << 23, 1 << 22).to(tl.float32, bitcast=True)
        scale = tl.where(s == 0xFF, float("nan"), scale)
    else:
        e = (s >> 3) & 0xF
        m = s & 7
        scale = tl.where(e == 0, m.to(tl.float32) * 0.001953125,
                         (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True))
        scale = tl.where((s & 0x7F) == 0x7F, float("nan"), scale)
        scale = (scale.to(tl.int32, bitcast=True) | ((s & 0x80) << 24)).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, R, C,
                    BR: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                    MX: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    blks = tl.program_id(1) * NB + tl.arange(0, NB)
    r3 = rows.to(tl.int64)[:, None, None]
    half_c = C // 2
    qc = (blks[:, None] * (BK // 2) + tl.arange(0, BK // 2)[None, :]).to(tl.int64)[None, :, :]
    b = tl.load(q_ptr + r3 * half_c + qc, mask=(r3 < R) & (qc < half_c), other=0).to(tl.int32)
    codes = tl.reshape(tl.join(b & 0xF, b >> 4), [BR, NB, BK])  # element 2i in the low nibble
    n_sc = C // BK
    sr = (rows // BM).to(tl.int64)[:, None]
    sc = blks[None, :]
    s = tl.load(s_ptr + sr * n_sc + sc, mask=(sr < R // BM) & (sc < n_sc), other=0).to(tl.int32)
    out = _block_values(codes, s, MX)
    c3 = (blks[:, None] * BK + tl.arange(0, BK)[None, :]).to(tl.int64)[None, :, :]
    tl.store(out_ptr + r3 * C + c3, out.to(out_ptr.dtype.element_ty), mask=(r3 < R) & (c3 < C))


@triton.jit
def _fp4_tile(q_ptr, s_ptr, rows, k0, R, C,
              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
              MX: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Scaled values (code × block scale, exact in BF16) of rows × [k0, k0 + BLOCK_K)."""
    r2 = rows.to(tl.int64)[:, None]
    half_c = C // 2
    kq = (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
    b = tl.load(q_ptr + r2 * half_c + kq, mask=(r2 < R) & (kq < half_c), other=0).to(tl.int32)
    codes = tl.reshape(tl.join(b & 0xF, b >> 4), [BLOCK_R, BLOCK_K // BK, BK])
    n_sc = C // BK
    ks = (k0 // BK + tl.arange(0, BLOCK_K // BK))[None, :]
    sr = (rows // BM).to(tl.int64)[:, None]
    s = tl.load(s_ptr + sr * n_sc + ks, mask=(sr < R // BM) & (ks < n_sc), other=0).to(tl.int32)
    v = _block_values(codes, s, MX)
    return tl.reshape(v, [BLOCK_R, BLOCK_K]).to(DOT_DTYPE)


# Kinds of qgemm.MeanTerm as the kernels see them.
TERM_NONE, TERM_ROW, TERM_COL, TERM_OUTER, TERM_SCALAR = 0, 1, 2, 3, 4


@triton.jit
def _add_term(out, rm, rn, M, N, KIND: tl.constexpr, u_ptr, v_ptr, k, HAS_K: tl.constexpr):
    """out + one MeanTerm, with the FP32 operations of MeanTerm.dense() and `out += ...`."""
    if KIND == 1:
        out = out + tl.expand_dims(tl.load(u_ptr + rm, mask=rm < M, other=0.0), 1)
    elif KIND == 2:
        out = out + tl.expand_dims(tl.load(v_ptr + rn, mask=rn < N, other=0.0), 0)
    elif KIND == 3:
        p = (tl.expand_dims(tl.load(u_ptr + rm, mask=rm < M, other=0.0), 1)
             * tl.expand_dims(tl.load(v_ptr + rn, mask=rn < N, other=0.0), 0))
        if HAS_K:
            p = p * k
        out = out + p
    elif KIND == 4:
        out = out + tl.load(u_ptr)
    return out


@triton.jit
def _epilogue(acc, scale_ptr, rm, rn, M, N,
              T1: tl.constexpr, u1, v1, k1, K1: tl.constexpr,
              T2: tl.constexpr, u2, v2, k2, K2: tl.constexpr,
              T3: tl.constexpr, u3, v3, k3, K3: tl.constexpr):
    out = acc * tl.load(scale_ptr)
    out = _add_term(out, rm, rn, M, N, T1, u1, v1, k1, K1)
    out = _add_term(out, rm, rn, M, N, T2, u2, v2, k2, K2)
    return _add_term(out, rm, rn, M, N, T3, u3, v3, k3, K3)


@triton.jit(do_not_specialize=["k1", "k2", "k3"])
def _scale_terms_kernel(c_ptr, o_ptr, scale_ptr, M, N,
                        T1: tl.constexpr, u1, v1, k1, K1: tl.constexpr,
                        T2: tl.constexpr, u2, v2, k2, K2: tl.constexpr,
                        T3: tl.constexpr, u3, v3, k3, K3: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BF16_OUT: tl.constexpr,
                        ACC: tl.constexpr):
    """O = C·scale + terms in one pass over the FP32 GEMM result C: in place (FP32), or with
    BF16_OUT rounded to nearest-even BF16 bit patterns in O (int16), saving a separate cast.
    ACC: O is an FP32 accumulator (wgrad's main_grad), O += C·scale + terms, one rounding."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    out = _epilogue(tl.load(c_ptr + offs, mask=mask, other=0.0), scale_ptr, rm, rn, M, N,
                    T1, u1, v1, k1, K1, T2, u2, v2, k2, K2, T3, u3, v3, k3, K3)
    if ACC:
        out = tl.load(o_ptr + offs, mask=mask, other=0.0) + out
    if BF16_OUT:
        # RNE on the bit pattern (the interpreter's float casts do not round like the GPU)
        u = out.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(out != out, 0x7FC0, r)  # NaN stays NaN (quiet, as torch writes it)
        tl.store(o_ptr + offs, r.to(tl.int32, bitcast=True).to(tl.int16), mask=mask)
    else:
        tl.store(o_ptr + offs, out, mask=mask)


@triton.jit(do_not_specialize=["k1", "k2", "k3"])
def _fp4_gemm_kernel(aq, as_, bq, bs, scale_ptr, c_ptr, M, N, K: tl.constexpr,
                     T1: tl.constexpr, u1, v1, k1, K1: tl.constexpr,
                     T2: tl.constexpr, u2, v2, k2, K2: tl.constexpr,
                     T3: tl.constexpr, u3, v3, k3, K3: tl.constexpr,
                     BM_A: tl.constexpr, BM_B: tl.constexpr, BK: tl.constexpr, MX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """C = (Â·B̂ᵀ)·s for FP4 operands A [M, K], B [N, K] (blocks along K): the packed codes are
    dequantized to BF16 in the prologue (exact), accumulated in FP32 by tensor cores, and the FP32
    tensor-scale product and qgemm's mean terms applied in the epilogue. K is a compile-time
    constant (a model has few reduction sizes; it also fixes the trip count of the K loop)."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)  # grouped order: neighbouring programs share A/B tiles in L2
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _fp4_tile(aq, as_, rm, k0, M, K, BLOCK_M, BLOCK_K, BK, BM_A, MX, DOT_DTYPE)
        b = _fp4_tile(bq, bs, rn, k0, N, K, BLOCK_N, BLOCK_K, BK, BM_B, MX, DOT_DTYPE)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    out = _epilogue(acc, scale_ptr, rm, rn, M, N,
                    T1, u1, v1, k1, K1, T2, u2, v2, k2, K2, T3, u3, v3, k3, K3)
    cm = rm.to(tl.int64)[:, None]
    cn = rn[None, :]
    tl.store(c_ptr + cm * N + cn, out, mask=(cm < M) & (cn < N))


@triton.jit
def _pairwise_rows(s, LOG_N: tl.constexpr, BF: tl.constexpr):
    """Sums of the 2^LOG_N rows of s [2^LOG_N, BF] in operand.pairwise_sum's order: adjacent rows
    added level by level (each level a single FP32 addition per pair, so the order is fixed)."""
    for i in tl.static_range(LOG_N):
        even, odd = tl.split(tl.permute(tl.reshape(s, [1 << (LOG_N - 1 - i), 2, BF]), (0, 2, 1)))
        s = even + odd
    return tl.reshape(s, [BF])


@triton.jit
def _nan_aware_extremes(x, valid, axis: tl.constexpr):
    """(min, max) of x over `axis` among `valid` entries; NaN where any valid entry is NaN."""
    nan = tl.max(((x != x) & valid).to(tl.int32), axis=axis) > 0
    lo = tl.min(tl.where(valid, x, float("inf")), axis=axis)
    hi = tl.max(tl.where(valid, x, float("-inf")), axis=axis)
    return tl.where(nan, float("nan"), lo), tl.where(nan, float("nan"), hi)


@triton.jit
def _token_stats_tile_kernel(x_ptr, s_t, s_f, T, F, psum, pmin, pmax,
                             BT: tl.constexpr, LOG_BT: tl.constexpr, BF: tl.constexpr):
    """Per tile of BT tokens (an aligned subtree of the pairwise sum): partial sums, min, max."""
    pid_t = tl.program_id(0)
    t = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)[:, None]
    fo = tl.program_id(1) * BF + tl.arange(0, BF)
    f = fo.to(tl.int64)[None, :]
    valid = (t < T) & (f < F)
    x = tl.load(x_ptr + t * s_t + f * s_f, mask=valid, other=0.0).to(tl.float32)  # +0.0 padding
    lo, hi = _nan_aware_extremes(x, valid, 0)
    out = pid_t.to(tl.int64) * F + fo
    tl.store(psum + out, _pairwise_rows(x, LOG_BT, BF), mask=fo < F)
    tl.store(pmin + out, lo, mask=fo < F)
    tl.store(pmax + out, hi, mask=fo < F)


@triton.jit
def _range_amax_kernel(lo_ptr, hi_ptr, sub_ptr, out_ptr, F,
                       BF: tl.constexpr, CHUNKS: tl.constexpr):
    """One program: max over features of max(|hi - sub|, |lo - sub|) as FP32 bits (NaN wins),
    over CHUNKS chunks of BF features (no memset and no atomics, unlike a grid of programs)."""
    best = tl.zeros([BF], dtype=tl.int32)
    for i in tl.static_range(CHUNKS):
        f = i * BF + tl.arange(0, BF)
        m = tl.load(sub_ptr + f, mask=f < F, other=0.0)
        hi = tl.load(hi_ptr + f, mask=f < F, other=0.0)
        lo = tl.load(lo_ptr + f, mask=f < F, other=0.0)
        best = tl.maximum(best, tl.maximum(_abs_bits(hi - m), _abs_bits(lo - m)))
    tl.store(out_ptr, tl.max(best, axis=0))


@triton.jit
def _token_stats_final_kernel(psum, pmin, pmax, P, F, sum_ptr, lo_ptr, hi_ptr,
                              P_PAD: tl.constexpr, LOG_P: tl.constexpr, BF: tl.constexpr):
    """The upper levels of the pairwise tree over the tile sums (zero tiles up to P_PAD), and the
    min / max over tiles."""
    p = tl.arange(0, P_PAD).to(tl.int64)[:, None]
    fo = tl.program_id(0) * BF + tl.arange(0, BF)
    f = fo[None, :]
    valid = (p < P) & (f < F)
    sums = _pairwise_rows(tl.load(psum + p * F + f, mask=valid, other=0.0), LOG_P, BF)
    lo, _ = _nan_aware_extremes(tl.load(pmin + p * F + f, mask=valid, other=0.0), valid, 0)
    _, hi = _nan_aware_extremes(tl.load(pmax + p * F + f, mask=valid, other=0.0), valid, 0)
    tl.store(sum_ptr + fo, sums, mask=fo < F)
    tl.store(lo_ptr + fo, lo, mask=fo < F)
    tl.store(hi_ptr + fo, hi, mask=fo < F)


# ---- host side -----------------------------------------------------------------------------

_LAUNCH = dict(num_warps=4)
# (rows, columns, warps) per program, the fastest of benchmarks/quant_kernels.py's sweep on an
# H100 (docs/performance.md). "transposed": operands read through swapped strides (wgrad Xᵀ, Gᵀ).
# "nvfp4 transposed": the NVFP4 1x16 quantize of such an operand without RHT, 15-33% faster
# than "transposed" at every model width in a GPU-bound sweep on an H200
# (results/kernel-sweep-h200-2026-12-01); the other transposed cases were not swept.
TILES = {"rows": (64, 64, 4), "transposed": (32, 64, 4), "nvfp4 transposed": (32, 32, 2)}


def _tile(R: int, C: int, x: torch.Tensor, bk: int, bm: int, tile=None,
          transposed_tile: str = "transposed") -> tuple[int, int, int]:
    if tile is None:
        transposed = x.stride(1) != 1 and x.stride(0) == 1
        tile = TILES[transposed_tile if transposed else "rows"]
    br, bc, warps = tile
    br = max(bm, min(br, triton.next_power_of_2(R)))
    bc = max(bk, min(bc, triton.next_power_of_2(C)))
    return br, bc, warps


def _sub_arg(x: torch.Tensor, sub: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    if sub is None:
        return x, -1
    R, C = x.shape
    if tuple(sub.shape) == (1, C):
        dim = 0
    elif tuple(sub.shape) == (R, 1):
        dim = 1
    else:
        raise ValueError(f"cannot subtract a {tuple(sub.shape)} tensor from a {R}x{C} operand "
                         "(expected [1, cols] or [rows, 1])")
    return sub.to(device=x.device, dtype=torch.float32).contiguous(), dim


def _rht_arg(signs: torch.Tensor | None, C: int) -> tuple[bool, int]:
    """(RHT, NEG) kernel arguments: the 16 signs as the bits of a compile-time constant (bit j set
    where s_j = -1), so no sign tensor is copied to the device. Read signs from the CPU (as
    random_signs makes them): GPU signs would synchronize here."""
    if signs is None:
        return False, 0
    if signs.numel() != RHT_BLOCK:
        raise ValueError(
            f"the fused Hadamard transform uses {RHT_BLOCK} signs, got {signs.numel()}"
        )
    if C % RHT_BLOCK:
        raise ValueError(
            f"the Hadamard transform needs the last dimension ({C}) divisible by {RHT_BLOCK}"
        )
    return True, sum(1 << j for j, v in enumerate(signs.tolist()) if v < 0)


def _offset_arg(where):
    """(offset, index tensor, from_tensor) for one entry of rng_offset: an int offset, or an int64
    tensor of global indices on the operand's device, one per local row / column."""
    if isinstance(where, torch.Tensor):
        return 0, where.contiguous(), True
    return int(where), None, False


def _int32(v: int) -> int:
    """A uint32 as the int32 with the same bits (Triton passes ints >= 2^31 as int64)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def amax(x: torch.Tensor, sub: torch.Tensor | None = None, tile=None,
         signs: torch.Tensor | None = None) -> torch.Tensor:
    """max |x - sub| as an FP32 0-dim tensor (NaN if any element is NaN), like
    (x.float() - sub).abs().amax(); with `signs`, of blockwise_rht(x.float() - sub, signs)."""
    R, C = x.shape
    sub_t, sub_dim = _sub_arg(x, sub)
    rht, neg = _rht_arg(signs, C)
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    br, bc, warps = _tile(R, C, x, RHT_BLOCK if rht else 1, 1, tile)
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    _amax_kernel[grid](x, x.stride(0), x.stride(1), sub_t, out, R, C,
                       BR=br, BC=bc, SUB_DIM=sub_dim, RHT=rht, NEG=neg,
                       enable_fp_fusion=False, num_warps=warps)
    return out.view(torch.float32).view(())


def quantize(x: torch.Tensor, fmt: str, block: tuple[int, int], *,
             amax_t: torch.Tensor | None = None, sub: torch.Tensor | None = None,
             signs: torch.Tensor | None = None, sr_key: int | None = None,
             sr_step: torch.Tensor | None = None, rng_offset=(0, 0), tile=None,
             values: torch.dtype | None = None, payload: bool = True):
    """NVFP4 (1x16, 16x16) or MXFP4 (1x32) quantization of x - sub along the last dimension;
    with `signs`, of blockwise_rht(x.float() - sub, signs), rotated in registers. The caller has
    validated the arguments. NVFP4 takes the tensor amax `amax_t` if given.

    Returns (codes uint8 [R, C/2] two per byte, block scales, FP32 0-dim tensor scale, scaled
    values); block scales are float8_e4m3fn [R/bm, C/bk] (NVFP4) or uint8 E8M0 exponents
    [R, C/32] (MXFP4). `values` (a DEQUANTIZE_DTYPES dtype): also write code × block scale
    [R, C] in that dtype in the same pass, equal bit for bit to scaled_values() of the codes and
    scales (else None). payload=False: skip the codes and block scales (returned as None) when
    only the GEMM operand is needed.

    Stochastic rounding when `sr_key` is given: the stream's uint32 key is sr_key itself
    (random.seed_key of an int seed) or, with `sr_step` (a one-element int64 tensor read on the
    device), the key of fold_seed(sr_key, step). rng_offset: per dimension the global index of
    the first local row / column, or an int64 tensor of every local one's global index."""
    if not payload and values is None:
        raise ValueError("quantize with payload=False writes nothing unless `values` is given")
    if values is not None and values not in DEQUANTIZE_DTYPES:
        raise ValueError(f"scaled values are written as one of {DEQUANTIZE_DTYPES}, not {values}")
    R, C = x.shape
    bm, bk = block
    mx = fmt == "mxfp4"
    sr = sr_key is not None
    sub_t, sub_dim = _sub_arg(x, sub)
    rht, neg = _rht_arg(signs, C)
    tensor_scale = torch.empty((), dtype=torch.float32, device=x.device)
    unread = tensor_scale  # the pointer argument of whatever this launch does not touch
    data = scales = vals = None
    if payload:
        data = torch.empty(R, C // 2, dtype=torch.uint8, device=x.device)
        scales = torch.empty((R, C // MXFP4_BLOCK) if mx else (R // bm, C // bk),
                             dtype=torch.uint8 if mx else torch.float8_e4m3fn, device=x.device)
    if values is not None:
        vals = torch.empty(R, C, dtype=values, device=x.device)
    if not mx and amax_t is None:
        amax_t = amax(x, sub, signs=signs)
    amax_arg = unread if mx else amax_t.to(device=x.device, dtype=torch.float32).reshape(1)
    step_seed = sr and sr_step is not None
    key = _int32(sr_key) if sr else 0
    step = sr_step.to(device=x.device, dtype=torch.int64) if step_seed else unread
    off_r, ridx, row_idx = _offset_arg(rng_offset[0]) if sr else (0, None, False)
    off_c, cidx, col_idx = _offset_arg(rng_offset[1]) if sr else (0, None, False)
    swept = not mx and bm == 1 and not rht
    br, bc, warps = _tile(R, C, x, bk, bm, tile, "nvfp4 transposed" if swept else "transposed")
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    _quantize_kernel[grid](
        x, x.stride(0), x.stride(1), sub_t, amax_arg,
        data if payload else unread, scales.view(torch.uint8) if payload else unread,
        tensor_scale, vals if vals is not None else unread,
        R, C, key, step, off_r, off_c, ridx if row_idx else unread, cidx if col_idx else unread,
        BR=br, NB=bc // bk, BK=bk, BM=bm, MX=mx, SR=sr, STEP_SEED=step_seed, SUB_DIM=sub_dim,
        ROW_IDX=row_idx, COL_IDX=col_idx, RHT=rht, NEG=neg, PAYLOAD=payload,
        VALUES=vals is not None, enable_fp_fusion=False, num_warps=warps,
    )
    return data, scales, tensor_scale, vals


def scaled_values(data: torch.Tensor, block_scales: torch.Tensor, block: tuple[int, int],
                  fmt: str, dtype: torch.dtype, tile=None) -> torch.Tensor:
    """Code × block scale of packed codes `data` [R, C/2] with the block scales quantize
    returns, written as `dtype` (BF16 or FP32): QuantizedTensor.scaled_values."""
    bm, bk = block
    data = data.contiguous()
    R, C = data.shape[0], data.shape[1] * 2
    out = torch.empty(R, C, dtype=dtype, device=data.device)
    br, bc, warps = _tile(R, C, out, bk, bm, tile)
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    _dequant_kernel[grid](data, block_scales.contiguous().view(torch.uint8), out, R, C,
                          BR=br, NB=bc // bk, BK=bk, BM=bm, MX=fmt == "mxfp4", num_warps=warps)
    return out


# BF16 tensor-core tiles for the fused GEMM; K steps of 128 cover whole 16/32 scale blocks.
GEMM_TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def gemm_supported(k: int) -> bool:
    """Whether scaled_mm covers a reduction dimension of k (whole K tiles)."""
    return k % GEMM_TILE["BLOCK_K"] == 0


_UNREAD_POINTERS: dict = {}


def _unread_pointer(device) -> torch.Tensor:
    """The pointer argument of an absent term, which the kernel never reads (one per device)."""
    key = str(device)
    if key not in _UNREAD_POINTERS:
        _UNREAD_POINTERS[key] = torch.empty(1, dtype=torch.float32, device=device)
    return _UNREAD_POINTERS[key]


def _vec(v: torch.Tensor, device) -> torch.Tensor:
    return v.to(device=device, dtype=torch.float32).contiguous().reshape(-1)


MAX_TERMS = 3  # qgemm adds at most 3 (two cross terms and μ_A·μ_B); the bias may make a 4th


def _term_args(terms, device) -> list:
    """Kernel arguments (kind, u, v, k, has_k) x 3 for up to three terms, each given as
    (row [M] | None, col [N] | None, k: int | None, scalar 0-dim | None), the fields of
    qgemm.MeanTerm: a scalar, the outer product row·colᵀ (times k if set), a row or a col."""
    if len(terms) > MAX_TERMS:
        raise ValueError(f"at most {MAX_TERMS} mean terms, got {len(terms)}")
    args = []
    unread = _unread_pointer(device)
    for t in list(terms) + [None] * (MAX_TERMS - len(terms)):
        row, col, k, scalar = t if t is not None else (None, None, None, None)
        if t is None:
            kind, u, v = TERM_NONE, None, None
        elif scalar is not None:
            kind, u, v = TERM_SCALAR, _vec(scalar, device), None
        elif row is not None and col is not None:
            kind, u, v = TERM_OUTER, _vec(row, device), _vec(col, device)
        elif row is not None:
            kind, u, v = TERM_ROW, _vec(row, device), None
        else:
            kind, u, v = TERM_COL, None, _vec(col, device)
        args += [kind, u if u is not None else unread, v if v is not None else unread,
                 float(k) if k is not None else 1.0, k is not None]
    return args


def scale_and_add_terms(out: torch.Tensor, scale: torch.Tensor, terms,
                        out_dtype: torch.dtype = torch.float32,
                        accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """out·scale + terms (qgemm's reference order) in one pass over the FP32 product, written
    in place (FP32) or to a new tensor of `out_dtype` (at most 3 terms: qgemm's maximum).
    `accumulate`: a contiguous FP32 tensor of out's shape that the result is added into (the
    sum rounded once, as accumulate.add_(result)); it is returned."""
    m, n = out.shape
    bf16 = out_dtype == torch.bfloat16 and accumulate is None
    dst = torch.empty(m, n, dtype=torch.bfloat16, device=out.device) if bf16 else out
    if accumulate is not None:
        dst = accumulate
    bm, bn = 32, 128
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _scale_terms_kernel[grid](out, dst.view(torch.int16) if bf16 else dst,
                              scale.to(device=out.device, dtype=torch.float32).reshape(1),
                              m, n, *_term_args(terms, out.device), BLOCK_M=bm, BLOCK_N=bn,
                              BF16_OUT=bf16, ACC=accumulate is not None, enable_fp_fusion=False,
                              **_LAUNCH)
    return dst if bf16 or accumulate is not None or out_dtype == torch.float32 else dst.to(out_dtype)


def scaled_mm(a_data: torch.Tensor, a_scales: torch.Tensor, a_block: tuple[int, int],
              b_data: torch.Tensor, b_scales: torch.Tensor, b_block: tuple[int, int], fmt: str,
              scale: torch.Tensor, terms=(), tile: dict | None = None) -> torch.Tensor:
    """FP32 (Â·B̂ᵀ)·scale + terms straight from packed FP4 operands A [M, K], B [N, K] of one
    format, blocks along K (codes and block scales as quantize returns them; the same block
    length; K a multiple of the K tile: gemm_supported). No BF16 copies of Â, B̂ are made."""
    t = dict(GEMM_TILE, **(tile or {}))
    m, k, n = a_data.shape[0], a_data.shape[1] * 2, b_data.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=a_data.device)
    grid = (triton.cdiv(m, t["BLOCK_M"]) * triton.cdiv(n, t["BLOCK_N"]),)
    _fp4_gemm_kernel[grid](
        a_data.contiguous(), a_scales.contiguous().view(torch.uint8),
        b_data.contiguous(), b_scales.contiguous().view(torch.uint8),
        scale.to(device=out.device, dtype=torch.float32).reshape(1), out, m, n, k,
        *_term_args(terms, out.device),
        enable_fp_fusion=False,
        BM_A=a_block[0], BM_B=b_block[0], BK=a_block[1], MX=fmt == "mxfp4",
        # The interpreter mishandles BF16 dot operands; FP32 holds the same (exact) values there
        # (and must not be rounded to TF32). On the GPU: BF16 tensor cores, FP32 accumulation.
        DOT_DTYPE=tl.float32 if interpreting() else tl.bfloat16,
        PRECISION="ieee" if interpreting() else "tf32", **t)
    return out


# (tokens, features, warps) per program of the stats pass; the tokens are a subtree of the
# pairwise sum. One warp per 64 x 64 tile was the fastest of a GPU-bound sweep on an H200 at
# 8192 tokens x 1024-8192 features (results/bench-h200-2026-12-01-run6/stats-sweep.jsonl):
# 2.3-2.7x the former 64 x 128 x 4, and 1.6-2.3x torch's column sum plus the residual amax pass
# that the stats pass replaces.
STATS_TILE = (64, 64, 1)


def token_stats(x: torch.Tensor, dim: int):
    """One read of x: FP32 sums over `dim` equal to operand.pairwise_sum bit for bit, and the
    per-feature (min, max) over `dim` (NaN where a NaN occurs)."""
    v = x if dim == 0 else x.t()  # sum over the rows of v [T, F]
    T, F = v.shape
    tokens, features, warps = STATS_TILE
    bt = min(tokens, triton.next_power_of_2(T))
    # bt and the number of tiles rounded up to a power of two multiply to next_pow2(T): the
    # kernel's zero padding is exactly pairwise_sum's.
    n_tiles = triton.cdiv(T, bt)
    p_pad = triton.next_power_of_2(n_tiles)
    bf = min(features, triton.next_power_of_2(F))
    dev = x.device
    psum, pmin, pmax = (torch.empty(n_tiles, F, dtype=torch.float32, device=dev) for _ in range(3))
    _token_stats_tile_kernel[(n_tiles, triton.cdiv(F, bf))](
        v, v.stride(0), v.stride(1), T, F, psum, pmin, pmax,
        BT=bt, LOG_BT=bt.bit_length() - 1, BF=bf, num_warps=warps)
    sums, lo, hi = (torch.empty(F, dtype=torch.float32, device=dev) for _ in range(3))
    bf2 = max(1, min(128, 8192 // p_pad))
    _token_stats_final_kernel[(triton.cdiv(F, bf2),)](
        psum, pmin, pmax, n_tiles, F, sums, lo, hi,
        P_PAD=p_pad, LOG_P=p_pad.bit_length() - 1, BF=bf2, **_LAUNCH)
    return sums, (lo, hi)


def range_amax(lo: torch.Tensor, hi: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
    """max over features of max(|hi - sub|, |lo - sub|) for FP32 vectors [F] (a feature's min,
    max and mean): the residual amax from token_stats' range, as an FP32 0-dim tensor (NaN if
    any term is NaN). One launch instead of the six small ops of its PyTorch form."""
    out = torch.empty(1, dtype=torch.int32, device=lo.device)
    args = [t.to(torch.float32).contiguous().reshape(-1) for t in (lo, hi, sub)]
    n = args[0].numel()
    _range_amax_kernel[(1,)](*args, out, n, BF=1024, CHUNKS=triton.cdiv(n, 1024), **_LAUNCH)
    return out.view(torch.float32).view(())
