"""Model architectures selectable with --model-preset, and their parameter counts.

Each preset fills the architecture flags (--num-layers, --hidden-size, ...) that the command line
leaves unset; an explicit flag always wins. Every preset also sets Megatron-LM's decoder flags
explicitly (RoPE, RMSNorm, SwiGLU, no biases, grouped-query attention, no dropout:
megatron_flags.DECODER_FLAGS), whose Megatron-LM defaults describe another model. The
vocabulary is not part of a preset: it comes from the tokenizer in use (padded, as Megatron-LM
does, to a multiple of --make-vocab-size-divisible-by x TP).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelArch:
    """A dense pre-norm decoder: RMSNorm, SwiGLU MLP, grouped-query attention with RoPE."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # head dimension
    qk_layernorm: bool
    rotary_base: float
    tie_embeddings: bool
    norm_epsilon: float
    max_position_embeddings: int
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    name: str
    arch: ModelArch
    source: str  # where the numbers come from


def _small(*, layers: int, hidden: int, ffn: int, heads: int, groups: int) -> ModelArch:
    return ModelArch(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                     num_attention_heads=heads, num_query_groups=groups, kv_channels=64,
                     qk_layernorm=True, rotary_base=10_000.0, tie_embeddings=True,
                     norm_epsilon=1e-6, max_position_embeddings=4096)


PRESETS = {
    # Qwen3-0.6B's config.json: head_dim 128 is independent of hidden/heads (16 x 128 = 2048 != 1024).
    "qwen3-0.6b": Preset(
        "qwen3-0.6b",
        ModelArch(num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
                  num_query_groups=8, kv_channels=128, qk_layernorm=True, rotary_base=1_000_000.0,
                  tie_embeddings=True, norm_epsilon=1e-6, max_position_embeddings=40960),
        "Qwen3-0.6B (Qwen3 technical report, config.json)",
    ),
    # Llama-3.2-1B's config.json. Its "llama3" RoPE frequency scaling is a long-context extension
    # of the released checkpoint, not part of pretraining from scratch, so it is not applied.
    "llama-1b": Preset(
        "llama-1b",
        ModelArch(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                  num_query_groups=8, kv_channels=64, qk_layernorm=False, rotary_base=500_000.0,
                  tie_embeddings=True, norm_epsilon=1e-5, max_position_embeddings=131072),
        "Llama-3.2-1B (config.json)",
    ),
    # Small Qwen3-shaped models for recipe comparisons on one GPU (the recipe-comparison
    # experiment, docs/results.md): QK-norm, GQA, SwiGLU, tied embeddings, head dim 64, RoPE
    # θ 1e4 for their 1k context. The name gives the non-embedding parameters.
    "qwen3-9m": Preset("qwen3-9m", _small(layers=6, hidden=384, ffn=1024, heads=6, groups=2),
                       "recipe-comparison model"),
    "qwen3-25m": Preset("qwen3-25m", _small(layers=8, hidden=512, ffn=1536, heads=8, groups=4),
                        "recipe-comparison model"),
    "qwen3-38m": Preset("qwen3-38m", _small(layers=12, hidden=512, ffn=1536, heads=8, groups=4),
                        "recipe-comparison model"),
    "qwen3-75m": Preset("qwen3-75m", _small(layers=12, hidden=768, ffn=2048, heads=12, groups=4),
                        "recipe-comparison model"),
    # For tests and CPU runs: Qwen3-shaped, every GEMM dimension a multiple of 32 (MXFP4 blocks)
    # also when split over 2 tensor-parallel ranks.
    "tiny": Preset(
        "tiny",
        ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4,
                  num_query_groups=2, kv_channels=32, qk_layernorm=True, rotary_base=10_000.0,
                  tie_embeddings=True, norm_epsilon=1e-6, max_position_embeddings=4096),
        "test model",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron-LM's padding: round up to a multiple of divisible_by x TP, so that every TP rank
    holds an equal slice of the embedding and output layer."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def parameter_counts(arch: ModelArch, vocab_size: int) -> dict:
    """Exact parameter counts of the model as built (no biases), by component."""
    q = arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    h = arch.hidden_size
    per_layer = (
        h * (q + 2 * kv)                                   # fused q/k/v projection
        + q * h                                            # attention output projection
        + (2 * arch.kv_channels if arch.qk_layernorm else 0)  # q and k RMSNorm (one head wide)
        + 3 * h * arch.ffn_hidden_size                     # SwiGLU gate, up and down projections
        + 2 * h                                            # input and pre-MLP RMSNorm
    )
    embedding = vocab_size * h
    output = 0 if arch.tie_embeddings else vocab_size * h
    decoder = arch.num_layers * per_layer + h  # + final RMSNorm
    return {
        "embedding": embedding,
        "output_layer": output,
        "decoder": decoder,
        "total": embedding + output + decoder,
    }


def matmul_flops_per_token(arch: ModelArch, vocab_size: int, seq_length: int) -> int:
    """Forward-pass FLOPs per token of all matrix multiplications (2 per multiply-add).

    Linear layers: 2 x their weights; attention scores and weighted sum: 2 x 2 x seq x q-width
    per layer, counted over the full (not causally halved) score matrix, as the PaLM / Megatron-LM
    MFU convention does. Training = 3 x this (forward, and backward for inputs and weights).
    """
    q = arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    h = arch.hidden_size
    linear = arch.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size)
    attention = arch.num_layers * 2 * seq_length * q
    logits = vocab_size * h
    return 2 * (linear + logits) + 2 * attention


def training_flops_per_iteration(arch: ModelArch, vocab_size: int, seq_length: int,
                                 global_batch_size: int) -> int:
    return 3 * matmul_flops_per_token(arch, vocab_size, seq_length) * seq_length * global_batch_size
