"""RMSNorm for megatron-core layer specs, without Transformer Engine or apex.

megatron-core 0.16.1's fallback, WrappedTorchNorm, does select torch.nn.RMSNorm for
config.normalization="RMSNorm", but it refuses sequence parallelism, leaves the weight without the
`sequence_parallel` attribute (which finalize_model_grads uses to all-reduce norm gradients
across tensor-parallel ranks), and ignores config.params_dtype / use_cpu_initialization. This
module does all three; the arithmetic is torch's own rms_norm.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w over the last dimension, statistics in FP32.

    Built by mcore as `RMSNorm(config=..., hidden_size=..., eps=...)` for the input / pre-MLP /
    final norms and, with hidden_size = head dim, for Qwen3-style q/k norms on [s, b, heads, d].
    With config.layernorm_zero_centered_gamma the weight is stored as w - 1 (initialised to 0).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"RMSNorm built with config.normalization={config.normalization!r}; "
                "set TransformerConfig(normalization='RMSNorm')"
            )
        self.hidden_size = hidden_size
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype, device=device))
        # Under sequence parallelism each TP rank sees different tokens, so the weight's gradient
        # is partial and finalize_model_grads sums it over the TP group by this attribute.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + 1 if self.zero_centered_gamma else self.weight
        # On CUDA torch runs ATen's fused kernel (aten._fused_rms_norm, forward and backward;
        # statistics in FP32 for BF16 inputs) only when weight and input share a dtype, hence the
        # cast; elsewhere it decomposes into PyTorch ops. The input is not copied to FP32 here.
        return torch.nn.functional.rms_norm(x, (self.hidden_size,), w.to(x.dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma}"
