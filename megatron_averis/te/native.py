"""Blackwell: the residual product Â·B̂ᵀ on TE's native NVFP4 GEMM (cuBLASLt block-scaled FP4).

On Hopper there is no FP4 tensor core and the adapter runs our emulated GEMM (exact BF16 values
of code × block scale, FP32 accumulation). On sm_100+ with TE's NVFP4 support the same product
can run in hardware: our packed codes and E4M3 block scales are already in NVFP4's layout (two
codes per byte, element 2i in the low nibble; one E4M3 scale per 16 elements), so they are
wrapped as TE NVFP4 storages and multiplied by `general_gemm`. The per-tensor scales and the
Averis rank-one terms stay ours (FP32, numerics.qgemm): each storage gets amax = 6·448, which
makes TE's global GEMM scale amax_A·amax_B/(6·448)² equal to 1, and qgemm multiplies by
s_A·s_B as in the emulation.

The recipe's `fp4_gemm` field chooses (recorded in the run's config; --fp4-gemm): `auto` uses
the native product wherever it can run, `native` requires it (refused at start-up off sm_100+ or
off the TE route, and per GEMM when a shape does not fit), `dequant` / `fused` keep the
emulation. Not run yet (no Blackwell machine): the first native product in a process is
therefore compared with the emulated one and must agree to FP32 accumulation-order tolerance,
else this raises and names the setting that forces emulation.
"""

from __future__ import annotations

import torch

from megatron_averis.formats import E2M1_MAX, E4M3_MAX
from megatron_averis.numerics.qgemm import mm_fp32

E2M1_E4M3_MAX = E2M1_MAX * E4M3_MAX
_checked = {"done": False}


def hardware_fp4(device: torch.device) -> bool:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (10, 0):
        return False
    import transformer_engine.pytorch as te

    return bool(te.is_nvfp4_available())


def _aligned(a, b) -> bool:
    (m, k), n = a.shape, b.shape[0]
    return m % 16 == 0 and n % 16 == 0 and k % 32 == 0


def product_for(a, b, fp4_gemm: str):
    """The native product for operands a, b, or None to use the emulation (fp4_gemm: the
    recipe's field)."""
    if fp4_gemm not in ("auto", "native"):
        return None
    usable = (a.qt is not None and b.qt is not None and a.qt.fmt == b.qt.fmt == "nvfp4"
              and _aligned(a, b) and hardware_fp4(a.qt.data.device))
    if not usable:
        if fp4_gemm == "native":
            raise RuntimeError("fp4_gemm=native but the native NVFP4 GEMM cannot be used here "
                               "(needs sm_100+, TE NVFP4 support, NVFP4 operands with M, N "
                               "multiples of 16 and K of 32); "
                               "use --fp4-gemm auto to emulate where it cannot")
        return None
    return checked_product


def _storage(qt):
    """Our QuantizedTensor [rows, K] as a TE NVFP4 storage with rowwise data only."""
    from transformer_engine.pytorch.constants import DType
    from transformer_engine.pytorch.tensor.storage.nvfp4_tensor_storage import NVFP4TensorStorage

    rows, k = qt.shape
    scales = qt.block_scales
    if qt.block[0] > 1:  # 16x16 tiles: TE stores one scale per row and 16-column block
        scales = scales.repeat_interleave(qt.block[0], dim=0)
    # TE's unswizzled scale layout: [rows rounded to 128, K/16 rounded to 4] bytes (E4M3 bits).
    padded = torch.zeros((-(-rows // 128) * 128, -(-(k // 16) // 4) * 4), dtype=torch.uint8,
                         device=qt.data.device)
    padded[:rows, : k // 16] = scales.contiguous().view(torch.uint8)
    amax = torch.full((1,), E2M1_E4M3_MAX, dtype=torch.float32, device=qt.data.device)
    return NVFP4TensorStorage(
        rowwise_data=qt.data.contiguous(), rowwise_scale_inv=padded, columnwise_data=None,
        columnwise_scale_inv=None, amax_rowwise=amax, amax_columnwise=None,
        fp4_dtype=DType.kFloat4E2M1, quantizer=None, with_gemm_swizzled_scales=False,
        fake_dtype=torch.bfloat16)


def native_product(a, b) -> torch.Tensor:
    """FP32 [M, N] = Â·B̂ᵀ (codes × block scales, no tensor scales) on the FP4 tensor cores."""
    from transformer_engine.pytorch.cpp_extensions import general_gemm

    # TE's general_gemm(A, B, layout="TN") computes B·Aᵀ (its fprop is general_gemm(W, X)).
    out, *_ = general_gemm(_storage(b.qt), _storage(a.qt), out_dtype=torch.float32, layout="TN")
    return out


def checked_product(a, b) -> torch.Tensor:
    out = native_product(a, b)
    if not _checked["done"]:
        ref = mm_fp32(a.values(), b.values())
        tol = 1e-5 * ref.abs().max().clamp_min(1e-30)
        err = (out - ref).abs().max()
        if not bool(err <= tol):
            raise RuntimeError(f"native NVFP4 GEMM disagrees with the emulated product (max "
                               f"abs diff {err.item():.3e}, allowed {tol.item():.3e}); set "
                               "--fp4-gemm dequant and report it")
        _checked["done"] = True
    return out
