"""Fused elementwise ops of the GPT layers without Transformer Engine or apex: which library
provides each one on a GPU, and the TransformerConfig fields that select them.

| op            | provider on CUDA                                                  | switch |
|---------------|-------------------------------------------------------------------|--------|
| RMSNorm       | torch.nn.functional.rms_norm, ATen's fused CUDA kernel forward and backward (aten._fused_rms_norm; norm.py) | always |
| SwiGLU        | megatron-core's bias_swiglu_impl, compiled by its jit_fuser (torch.compile) | bias_activation_fusion |
| RoPE          | megatron-core's own rotation (rope_utils._apply_rotary_pos_emb_bshd) compiled by the same jit_fuser, installed as rope_utils' fused provider where Transformer Engine leaves that slot empty | apply_rope_fusion |
| cross entropy | megatron-core's fused_vocab_parallel_cross_entropy (its jit_fuser pieces) | cross_entropy_loss_fusion, cross_entropy_fusion_impl="native" |

megatron-core's RoPE fusion is Transformer Engine's kernel only: rope_utils looks up
`fused_apply_rotary_pos_emb` at call time and TransformerConfig refuses apply_rope_fusion while
it is None. install_rope_fusion() fills that slot with the compiled rotation (TE's kernel, when
present, is left in place). On CPU every op runs megatron-core's unfused PyTorch code:
torch.compile would spend minutes compiling C++ for no gain, and the fused cross entropy returns
BF16 gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.jit import jit_fuser
from megatron.core.models.common.embeddings import rope_utils

# Compiled once per process; torch.compile specializes on shapes and recompiles on new ones
# (statically, after static_compiles()).
_rotate_compiled = jit_fuser(rope_utils._apply_rotary_pos_emb_bshd)


def static_compiles() -> None:
    """Compile every new shape the compiled fusions meet as its own static kernel.

    By default torch.compile recompiles a function's second shape with symbolic sizes
    ("automatic dynamic shapes"). Shapes are fixed within a run, yet a few still differ per
    call site: RoPE on q and on k under grouped-query attention, and any second model built in
    one process. The symbolic kernels were 2.5-3x slower on an H200 (SwiGLU and cross entropy
    of a second model, docs/performance.md), so a fixed-shape run compiles each shape once.
    """
    torch._dynamo.config.automatic_dynamic_shapes = False


def compiled_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor,
                                  interleaved: bool = False) -> torch.Tensor:
    """RoPE of t [s, b, heads, d] by freqs [s, 1, 1, rot_dim], as Transformer Engine's
    fused_apply_rotary_pos_emb is called by rope_utils.apply_rotary_pos_emb; the arithmetic
    is megatron-core's unfused rotation, compiled into one kernel per direction."""
    return _rotate_compiled(t, freqs, rotary_interleaved=interleaved)


def install_rope_fusion() -> None:
    """Make apply_rope_fusion=True valid without Transformer Engine (idempotent)."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = compiled_apply_rotary_pos_emb


@dataclass(frozen=True)
class Fusions:
    """Which fused ops a run asks for (the flags --no-rope-fusion, --no-bias-swiglu-fusion,
    --cross-entropy-loss-fusion), resolved against the device and precision."""

    rope: bool = True
    swiglu: bool = True
    cross_entropy: bool = False

    @classmethod
    def from_flags(cls, flags) -> "Fusions":
        """From anything carrying the flags' argparse dests (the namespace, ModelConfig)."""
        return cls(rope=flags.apply_rope_fusion, swiglu=flags.bias_swiglu_fusion,
                   cross_entropy=flags.cross_entropy_loss_fusion)

    def off_reasons(self, *, on_gpu: bool, bf16: bool) -> list[str]:
        """Why requested fusions will not run (empty: all of them run)."""
        asked = [name for name, on in (("RoPE", self.rope), ("SwiGLU", self.swiglu),
                                       ("cross entropy", self.cross_entropy)) if on]
        if asked and not on_gpu:
            return [f"fused {', '.join(asked)}: off without CUDA (megatron-core's unfused PyTorch "
                    "ops run)"]
        if self.cross_entropy and not bf16:
            return ["fused cross entropy: off for FP32 parameters (megatron-core's fused cross "
                    "entropy returns BF16 gradients); the unfused FP32 one runs"]
        return []

    def config_fields(self, *, on_gpu: bool, bf16: bool) -> dict:
        """TransformerConfig fields selecting the fused ops that run on this device and
        precision; installs the RoPE provider when RoPE fusion is on, and makes the compiled
        fusions static per shape."""
        rope = self.rope and on_gpu
        if rope:
            install_rope_fusion()
        if on_gpu and (self.rope or self.swiglu or self.cross_entropy):
            static_compiles()
        return dict(
            apply_rope_fusion=rope,
            bias_activation_fusion=self.swiglu and on_gpu,
            cross_entropy_loss_fusion=self.cross_entropy and on_gpu and bf16,
            cross_entropy_fusion_impl="native",
        )
