"""Megatron-LM command lines: the stored Qwen3-0.6B command passes --dry-run; Megatron-LM's
meanings and defaults; what cannot be built is refused by flag name."""

import os
import shlex

import pytest

from megatron_averis.training.arguments import ConfigError, finalize_args, parse_args
from megatron_averis.training.loop import main

COMMAND = os.path.join(os.path.dirname(os.path.abspath(__file__)), "commands",
                       "megatron_lm_qwen3_0.6b.sh")


def stored_command(tmp_path, drop=(), add=()) -> list[str]:
    """The stored command, $VARIABLES filled in; `drop` removes flags (with their values)."""
    env = {"CHECKPOINT_PATH": str(tmp_path / "ckpt"), "TENSORBOARD_LOGS_PATH": str(tmp_path / "tb")}
    argv = []
    with open(COMMAND, encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            words = shlex.split(line)
            if words[0] in drop:
                continue
            argv += [env.get(w[1:], w) if w.startswith("$") else w for w in words]
    return argv + list(add)


def refusal(argv) -> str:
    with pytest.raises(ConfigError) as e:
        finalize_args(parse_args(argv), 1)
    return "\n".join(e.value.problems)


def test_stored_qwen3_command_passes_dry_run(tmp_path, capsys):
    assert main(stored_command(tmp_path, add=["--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "dry run: configuration valid" in out and "averis recipe" in out
    # Qwen3-0.6B's published size: 596,049,920 parameters with its 151,936-entry embedding
    # (NullTokenizer 151,643 + end-of-document, padded to a multiple of 1187).
    assert '"total": 596049920' in out and '"padded_vocab_size": 151936' in out
    # 2,560,000 samples / 128 per step; warm-up 1% of the decay (the whole run) in samples.
    assert '"train_iters": 20000' in out and '"warmup": 25600' in out
    assert "--use-flash-attn: accepted, no effect here" in out
    assert not (tmp_path / "ckpt").exists()  # nothing written, nothing trained


def test_stored_command_resolves_megatron_meanings(tmp_path):
    args = finalize_args(parse_args(stored_command(tmp_path)), 1)
    assert args.recipe.name == "averis" and args.fp4_format == "e2m1" and args.bf16
    assert args.recompute_granularity == "selective"  # --recompute-activations
    assert (args.arch.num_query_groups, args.arch.ffn_hidden_size, args.arch.kv_channels) == (8, 3072, 128)
    assert args.arch.tie_embeddings and args.arch.attention_dropout == 0.0
    assert args.transformer_impl == "local" and args.tokenizer_type == "NullTokenizer"


def test_abbreviations_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(stored_command(tmp_path, drop=("--seq-length",), add=["--seq-len", "4096"]))


@pytest.mark.parametrize("drop, expected", [
    ("--position-embedding-type", "--position-embedding-type: learned_absolute is not supported (supported: rope)"),
    ("--normalization", "--normalization: LayerNorm is not supported (supported: RMSNorm)"),
    ("--swiglu", "--swiglu: absent is not supported (supported: given)"),
    ("--disable-bias-linear", "--disable-bias-linear: absent is not supported"),
])
def test_architecture_megatron_defaults_are_refused_by_name(tmp_path, drop, expected):
    assert expected in refusal(stored_command(tmp_path, drop=(drop,)))


@pytest.mark.parametrize("add, expected", [
    (["--fp8-format", "hybrid"], "--fp8-format is not supported"),
    (["--fp16"], "--fp16 is not supported; use --bf16"),
    (["--apply-layernorm-1p"], "--apply-layernorm-1p is not supported"),
    (["--rampup-batch-size", "16", "16", "1000"], "--rampup-batch-size is not supported"),
    (["--num-experts", "8"], "--num-experts is not supported"),
    (["--rotary-percent", "0.5"], "--rotary-percent: 0.5 is not supported (supported: 1.0)"),
])
def test_unsupported_features_are_refused_by_name(tmp_path, add, expected):
    assert expected in refusal(stored_command(tmp_path, add=add))


def test_unsupported_layout_and_format_name_supported_values(tmp_path):
    msg = refusal(stored_command(tmp_path, drop=("--context-parallel-size", "--ckpt-format"),
                                 add=["--context-parallel-size", "2", "--ckpt-format", "torch"]))
    assert "--context-parallel-size 2 is not supported by this trainer (supported: 1)" in msg
    assert "--ckpt-format torch is not supported (supported: torch_dist" in msg


def test_megatron_defaults_without_a_preset(tmp_path):
    base = stored_command(tmp_path, drop=("--ffn-hidden-size", "--group-query-attention",
                                          "--attention-dropout", "--hidden-dropout"))
    args = finalize_args(parse_args(base + ["--num-query-groups", "16"]), 1)
    # SwiGLU default FFN: 2/3 of 4h rounded down to a multiple of 64: 4*1024*2/3 = 2730.7 -> 2688.
    assert args.arch.ffn_hidden_size == 2688
    assert (args.arch.attention_dropout, args.arch.hidden_dropout) == (0.1, 0.1)
    assert (args.log_interval, parse_args(["--lr", "1"]).eval_iters) == (1, 100)
    defaults = parse_args([])
    assert (defaults.log_interval, defaults.eval_iters, defaults.eval_interval,
            defaults.lr_decay_style, defaults.adam_beta2, defaults.weight_decay) == (
        100, 100, None, "linear", 0.999, 0.01)
    # Without --group-query-attention Megatron-LM ignores --num-query-groups: refused here.
    assert "--num-query-groups 8 needs --group-query-attention" in refusal(base)


def test_fp4_flags_as_in_megatron(tmp_path):
    base = stored_command(tmp_path, drop=("--fp4-recipe", "--fp4-format"))
    assert finalize_args(parse_args(base), 1).recipe.name == "bf16"
    assert finalize_args(parse_args(base + ["--fp4-format", "e2m1"]), 1).recipe.name == "nvfp4"
    args = finalize_args(parse_args(base + [
        "--fp4-format", "e2m1", "--fp4-recipe", "custom", "--fp4-quantizer-factory",
        "megatron_averis.te.factories.averis_rht", "--transformer-impl", "local"]), 1)
    assert args.recipe.name == "averis-rht"
    assert "--fp4-recipe custom needs --fp4-quantizer-factory" in refusal(
        base + ["--fp4-recipe", "custom"])
    assert "is not a megatron-averis quantizer factory" in refusal(
        base + ["--fp4-recipe", "custom", "--fp4-quantizer-factory", "os.getcwd"])
    assert "Failed to import module 'no_such_module'" in refusal(
        base + ["--fp4-recipe", "custom", "--fp4-quantizer-factory", "no_such_module.f"])
    # Megatron-LM's custom recipe is a TE CustomRecipe: it selects the TE layers by default.
    args = parse_args(base + ["--fp4-recipe", "custom", "--fp4-quantizer-factory",
                              "megatron_averis.te.factories.averis"])
    with pytest.raises(ConfigError):  # no CUDA/TE here, or it would pass
        finalize_args(args, 1)
    assert args.transformer_impl == "transformer_engine"


def test_sample_and_iteration_flags_do_not_mix(tmp_path):
    msg = refusal(stored_command(tmp_path, add=["--lr-decay-iters", "100"]))
    assert "--lr-decay-iters does not go with --train-samples" in msg
    assert "exactly one of --train-iters and --train-samples" in refusal(
        stored_command(tmp_path, add=["--train-iters", "10"]))


def test_tokenizer_types(tmp_path):
    base = stored_command(tmp_path, drop=("--vocab-size",))
    assert "NullTokenizer needs --vocab-size" in refusal(base)
    hf = stored_command(tmp_path, drop=("--tokenizer-type", "--vocab-size"),
                        add=["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                             "Qwen/Qwen3-0.6B"])
    assert "model names are not downloaded" in refusal(hf)
    with pytest.raises(SystemExit):  # GPT-2 BPE and others: argparse names the supported types
        parse_args(stored_command(tmp_path, drop=("--tokenizer-type",),
                                  add=["--tokenizer-type", "GPT2BPETokenizer"]))


def test_sentencepiece_tokenizer_types(tmp_path):
    model = tmp_path / "tok.model"
    model.write_bytes(b"")  # start-up checks only its existence and kind
    base = stored_command(tmp_path, drop=("--tokenizer-type", "--vocab-size", "--mock-data"),
                          add=["--tokenizer-model", str(model), "--data-path", str(tmp_path / "x")])

    def resolved(*extra):
        args = parse_args(base + list(extra))
        with pytest.raises(ConfigError):  # the dataset does not exist; the tokenizer is resolved
            finalize_args(args, 1)
        return args

    assert resolved().tokenizer_type == "GPTSentencePieceTokenizer"  # from the .model file
    assert resolved("--tokenizer-type", "SentencePieceTokenizer").tokenizer_type == "SentencePieceTokenizer"
    with pytest.raises(ConfigError) as e:
        finalize_args(parse_args(base + ["--tokenizer-type", "HuggingFaceTokenizer"]), 1)
    assert "is a GPTSentencePieceTokenizer file; give the matching --tokenizer-type" in str(e.value)
