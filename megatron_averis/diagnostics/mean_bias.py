"""Mean-bias statistics of one GEMM operand x [tokens, features] (a linear layer's input X, or its
output gradient G), as in the Averis paper: how large the per-feature mean over tokens is, how much
of the outliers it explains, how well it aligns with the dominant singular direction, and what
splitting it off does to NVFP4 quantization.

μ = mean of x over tokens (float64), R = x − 1·μᵀ the residual. Statistics are float64; the
quantization errors use the project's NVFP4 path (numerics.quantize_operand) exactly as the fprop
(X) and dgrad (G) operands are quantized: 1x16 blocks along features, RNE.
"""

from __future__ import annotations

import math

import torch

from megatron_averis.formats import NVFP4_BLOCK
from megatron_averis.numerics.hadamard import random_signs
from megatron_averis.numerics.operand import quantize_operand

# Column order of the report (and of the CSV written by tools/analyze_mean_bias.py).
METRICS = (
    "mean_norm",           # ‖μ‖₂
    "residual_rms_norm",   # sqrt(mean over tokens of ‖r_t‖²)
    "mean_to_residual",    # ‖μ‖ / residual_rms_norm
    "mean_energy_share",   # T‖μ‖² / ‖x‖_F²  (‖x‖² = T‖μ‖² + ‖R‖² exactly)
    "topk_mean_share",     # share of the top-k |x| that the mean accounts for
    "cos_mean_top_sv",     # |cos(μ, v₁)|, v₁ the top right singular vector of x
    "qerr_nvfp4",          # ‖Q(x) − x‖_F / ‖x‖_F
    "qerr_nvfp4_split",    # the same with the mean split (μ stored in mean_format)
    "qerr_nvfp4_rht",      # with a 16-block random Hadamard transform
    "qerr_nvfp4_split_rht",
    "dyn_range",           # amax / median 1x16-block amax of x
    "dyn_range_split",     # the same of R
)


def _check(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [tokens, features] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"a mean over tokens needs at least 2 tokens, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError("the tensor has inf or NaN entries; mean-bias statistics need finite values")
    return x.double()


def split_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ [features], R [tokens, features]) in float64."""
    x = _check(x)
    mu = x.mean(dim=0)
    return mu, x - mu


def mean_norm_stats(x: torch.Tensor) -> dict:
    mu, r = split_mean(x)
    t = x.shape[0]
    mean_sq = float(mu.square().sum())
    res_sq = float(r.square().sum())
    residual_rms = math.sqrt(res_sq / t)
    total = t * mean_sq + res_sq
    return {
        "mean_norm": math.sqrt(mean_sq),
        "residual_rms_norm": residual_rms,
        "mean_to_residual": math.sqrt(mean_sq) / residual_rms if residual_rms > 0 else math.inf,
        "mean_energy_share": t * mean_sq / total if total > 0 else 0.0,
    }


def topk_mean_share(x: torch.Tensor, k: int) -> float:
    """Σ sign(x_ij)·μ_j / Σ |x_ij| over the k entries of largest |x|.

    Since |x_ij| = sign(x_ij)·μ_j + sign(x_ij)·r_ij, this is the part of the outliers' magnitude
    contributed by the mean (the rest is the residual's); negative when the mean points away.
    """
    mu, _ = split_mean(x)
    x = x.double()
    k = min(max(int(k), 1), x.numel())
    idx = x.abs().flatten().topk(k).indices
    vals = x.flatten()[idx]
    mu_at = mu[idx % x.shape[1]]
    denom = float(vals.abs().sum())
    return float((torch.sign(vals) * mu_at).sum()) / denom if denom > 0 else 0.0


def top_right_singular_vector(x: torch.Tensor) -> torch.Tensor:
    """v₁ of x = UΣVᵀ (float64, unit norm; the sign is arbitrary), from the Gram matrix of the
    smaller side: eigh(xᵀx) when features ≤ tokens, else v₁ ∝ xᵀu₁ with u₁ from eigh(xxᵀ)."""
    x = _check(x)
    t, f = x.shape
    if f <= t:
        _, vecs = torch.linalg.eigh(x.T @ x)
        return vecs[:, -1]
    _, vecs = torch.linalg.eigh(x @ x.T)
    v = x.T @ vecs[:, -1]
    return v / v.norm()


def cos_mean_top_singular(x: torch.Tensor) -> float:
    mu, _ = split_mean(x)
    n = float(mu.norm())
    if n == 0:
        return 0.0
    return abs(float(mu @ top_right_singular_vector(x))) / n


def _median(v: torch.Tensor) -> float:
    """Median as NumPy defines it (the mean of the two middle values for an even count)."""
    s = v.flatten().sort().values
    n = s.numel()
    return float(s[n // 2]) if n % 2 else float(s[n // 2 - 1] + s[n // 2]) / 2


def block_dynamic_range(x: torch.Tensor, block: int = NVFP4_BLOCK) -> float:
    """amax(|x|) / median over 1 x `block` blocks (along features) of the block amax: how many
    times larger the tensor-wide maximum is than a typical block's, i.e. how much of the FP4
    (E4M3 block scale) range the outliers use up."""
    t, f = x.shape
    if f % block:
        raise ValueError(f"{f} features are not a multiple of the {block}-element block")
    blocks = x.double().abs().view(t, f // block, block).amax(dim=-1)
    med = _median(blocks)
    return float(blocks.max()) / med if med > 0 else math.inf


# Block orientations of an operand x [tokens, features]: 1x16 blocks along features, as fprop and
# dgrad quantize X and G, or along tokens, as wgrad quantizes Xᵀ and Gᵀ. The mean is over tokens
# in both.
ORIENTATIONS = ("features", "tokens")


def quantization_errors(x: torch.Tensor, mean_format: str = "bf16", rht_seed: int = 0,
                        along: str = "features") -> dict:
    """Relative Frobenius error of NVFP4 (RNE) without and with the mean split, each without
    and with the random Hadamard transform (signs from `rht_seed`, as the recipes draw them), in
    1x16 blocks `along` features or tokens."""
    if along not in ORIENTATIONS:
        raise ValueError(f"along must be one of {ORIENTATIONS}, got {along!r}")
    ref = _check(x)
    a, mean_dim = (x, 0) if along == "features" else (x.t().contiguous(), 1)
    ref = ref if along == "features" else ref.t()
    if a.shape[1] % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs {along} ({a.shape[1]}) to be a multiple of {NVFP4_BLOCK}")
    norm = float(ref.norm())
    signs = random_signs(rht_seed).to(x.device)
    out = {}
    for name, split, s in (("qerr_nvfp4", False, None), ("qerr_nvfp4_split", True, None),
                           ("qerr_nvfp4_rht", False, signs), ("qerr_nvfp4_split_rht", True, signs)):
        op = quantize_operand(a, "nvfp4", mean_dim=mean_dim if split else None,
                              mean_format=mean_format, signs=s)
        err = float((op.dequantize() - ref).norm())
        out[name] = err / norm if norm > 0 else 0.0
    return out


def mean_bias_report(x: torch.Tensor, topk_fraction: float = 1e-3, mean_format: str = "bf16",
                     rht_seed: int = 0) -> dict:
    """Every statistic of METRICS for x [tokens, features]."""
    if not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    _, r = split_mean(x)
    rep = mean_norm_stats(x)
    rep["topk_mean_share"] = topk_mean_share(x, math.ceil(topk_fraction * x.numel()))
    rep["cos_mean_top_sv"] = cos_mean_top_singular(x)
    rep.update(quantization_errors(x, mean_format, rht_seed))
    rep["dyn_range"] = block_dynamic_range(x)
    rep["dyn_range_split"] = block_dynamic_range(r)
    return {k: rep[k] for k in METRICS}
