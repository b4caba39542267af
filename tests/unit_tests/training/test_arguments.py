"""Start-up validation: every problem is reported before any work, with the change that fixes it."""

import numpy as np
import pytest

from megatron_averis.training.arguments import ConfigError, finalize_args, parse_args
from megatron_averis.training.presets import PRESETS


def write_indexed(prefix, documents: int):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i in range(documents):
        builder.add_document(np.arange(5 + i % 7, dtype=np.uint16), [5 + i % 7])
    builder.finalize(f"{prefix}.idx")


@pytest.fixture
def files(tmp_path):
    write_indexed(tmp_path / "a", 1000)
    write_indexed(tmp_path / "b", 1000)
    write_indexed(tmp_path / "small", 3)
    (tmp_path / "tok.model").write_bytes(b"")  # only its existence is checked at start-up
    return tmp_path


def argv(files, *extra):
    return ["--model-preset", "qwen3-0.6b", "--seq-length", "1024", "--micro-batch-size", "2",
            "--train-iters", "100", "--lr", "3e-4", "--tokenizer-model", str(files / "tok.model"),
            "--data-path", str(files / "a"), *extra]


def finalize(files, *extra, world_size=1):
    return finalize_args(parse_args(argv(files, *extra)), world_size)


def problems(files, *extra, world_size=1) -> str:
    with pytest.raises(ConfigError) as e:
        finalize(files, *extra, world_size=world_size)
    return "\n".join(e.value.problems)


def test_preset_fills_architecture_and_flags_override(files):
    args = finalize(files, "--num-layers", "4")
    qwen = PRESETS["qwen3-0.6b"].arch
    assert args.arch.num_layers == 4
    assert (args.arch.hidden_size, args.arch.kv_channels, args.arch.num_query_groups) == (1024, 128, 8)
    assert args.arch.qk_layernorm and args.arch.tie_embeddings and args.arch.rotary_base == qwen.rotary_base
    assert not finalize(files, "--no-qk-layernorm", "--untie-embeddings-and-output-weights").arch.tie_embeddings
    llama = finalize_args(parse_args(argv(files) + ["--model-preset", "llama-1b"]), 1).arch
    assert (llama.num_layers, llama.hidden_size, llama.ffn_hidden_size, llama.num_attention_heads,
            llama.num_query_groups, llama.rotary_base, llama.qk_layernorm) == (16, 2048, 8192, 32, 8,
                                                                               500000.0, False)


def test_derived_batch_sizes(files):
    args = finalize(files, "--tensor-model-parallel-size", "2", "--global-batch-size", "32",
                    world_size=8)
    assert (args.data_parallel_size, args.num_microbatches) == (4, 4)
    assert finalize(files, world_size=4).global_batch_size == 8  # default: micro x DP


def test_recipe_from_flags(files):
    # Unquantized GEMMs on FP32 parameters are labelled fp32, with --bf16 bf16.
    assert finalize(files).recipe.name == "fp32" and not finalize(files).bf16
    assert finalize(files, "--bf16").recipe.name == "bf16"
    args = finalize(files, "--fp4-recipe", "averis", "--fp4-recipe-override", "wgrad_rht=true",
                    "--first-last-layers-bf16", "--num-layers-at-end-in-bf16", "2")
    assert args.bf16 and args.recipe.name == "averis" and args.recipe.wgrad_rht
    assert (args.recipe.bf16_first_layers, args.recipe.bf16_last_layers) == (1, 2)
    assert args.run_name == "qwen3-0.6b-averis"


def test_global_batch_not_divisible_names_valid_sizes(files):
    msg = problems(files, "--global-batch-size", "10", world_size=4)
    assert "--global-batch-size 10 is not divisible by --micro-batch-size x data-parallel size = 2 x 4 = 8" in msg
    assert "--global-batch-size 8 or 16" in msg


def test_fp4_token_count_must_fill_blocks(files):
    msg = problems(files, "--fp4-recipe", "nvfp4-plain", "--micro-batch-size", "1", "--seq-length", "1000")
    assert "1000 tokens per GEMM is not a multiple of 16" in msg and "--seq-length 1000" in msg
    # Under sequence parallelism only the micro-batch must fill blocks: 1 x 1056 / 2 = 528 tokens
    # per rank are not whole MXFP4 32-blocks, so those layers gather BF16 instead of FP4
    # (linear.function._gathers_fp4), but 1056 = 33 x 32 is accepted; 1040 is not.
    finalize(files, "--fp4-recipe", "mxfp4", "--micro-batch-size", "1", "--seq-length", "1056",
             "--tensor-model-parallel-size", "2", "--sequence-parallel", world_size=2)
    msg = problems(files, "--fp4-recipe", "mxfp4", "--micro-batch-size", "1", "--seq-length", "1040",
                   "--tensor-model-parallel-size", "2", "--sequence-parallel", world_size=2)
    assert "1040 tokens per GEMM is not a multiple of 32" in msg and "--seq-length 1040" in msg
    # BF16 has no blocks.
    finalize(files, "--bf16", "--micro-batch-size", "1", "--seq-length", "1000")


def test_fp4_layer_widths_must_fill_blocks(files):
    msg = problems(files, "--fp4-recipe", "mxfp4", "--ffn-hidden-size", "3056")
    assert "linear_fc2 (per TP rank): in_features=3056" in msg and "multiple of 32" in msg


def test_tensor_parallel_must_divide_heads(files):
    msg = problems(files, "--tensor-model-parallel-size", "3", world_size=3)
    assert "TP 3 does not divide the 16 attention heads" in msg
    assert "TP 3 does not divide the 8 key/value heads" in msg


def test_parallel_layout_problems(files):
    msg = problems(files, "--tensor-model-parallel-size", "2", world_size=3)
    assert "world size 3 is not divisible by TP x PP = 2 x 1" in msg
    assert "--num-layers 28 is not divisible by --pipeline-model-parallel-size 3" in problems(
        files, "--pipeline-model-parallel-size", "3", world_size=3)
    assert "--sequence-parallel needs --tensor-model-parallel-size > 1" in problems(files, "--sequence-parallel")
    assert "--seq-length 1025 is not divisible by TP 2" in problems(
        files, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "1025",
        world_size=2)


def test_missing_data_and_tokenizer(files):
    msg = problems(files, "--data-path", str(files / "missing"), "--tokenizer-model", str(files / "no.model"))
    assert "dataset" in msg and "missing.bin" in msg and "missing.idx" in msg
    assert "--tokenizer-model" in msg and "does not exist" in msg
    # Weighted blends check every prefix.
    finalize(files, "--data-path", "0.3", str(files / "a"), "0.7", str(files / "b"))
    assert "missing2.bin" in problems(files, "--data-path", "0.3", str(files / "a"), "0.7",
                                      str(files / "missing2"))


def test_all_problems_reported_at_once(files):
    msg = problems(files, "--global-batch-size", "3", "--lr", "-1", "--tokenizer-model", "nope",
                   world_size=2)
    assert msg.count("\n") >= 2 and "--lr must be > 0" in msg and "nope" in msg


def test_schedule_and_validation_problems(files):
    assert "--lr-decay-style WSD needs --lr-wsd-decay-iters" in problems(files, "--lr-decay-style", "WSD")
    # 100 iterations x global batch 2 = 200 samples
    assert "the LR warm-up (200 samples) must be >= 0 and shorter than the decay (200 samples)" in problems(
        files, "--lr-warmup-iters", "100")
    assert "no validation data" in problems(files, "--split", "100,0,0")
    assert finalize(files, "--split", "100,0,0", "--eval-iters", "0").has_valid_data is False


def test_checkpoint_flags(files, tmp_path):
    assert "--save-interval needs --save DIR" in problems(files, "--save-interval", "10")
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "iter_0000005").mkdir()
    for name in ("metadata.json", "common.pt"):
        (save / "iter_0000005" / name).write_text("{}")
    (save / "latest_checkpointed_iteration.txt").write_text("5\n")
    msg = problems(files, "--save", str(save))
    assert "already holds a checkpoint (iteration 5)" in msg and f"--load {save}" in msg
    finalize(files, "--save", str(save), "--load", str(save))
    (save / "latest_checkpointed_iteration.txt").unlink()  # checkpoint files but no tracker
    assert "holds checkpoint files (iter_0000005) but no latest_checkpointed_iteration.txt" in problems(
        files, "--save", str(save), "--load", str(save))


def test_wandb_mode_needs_wandb(files, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert "wandb is not installed" in problems(files, "--wandb-mode", "offline")
    finalize(files)  # absent and not asked for: fine (a message at start-up says so)


def test_every_dataset_must_fill_every_split(files):
    # 3 sequences: 969,30,1 leaves valid (and test) without one; megatron-core would loop forever.
    msg = problems(files, "--data-path", "0.5", str(files / "a"), "0.5", str(files / "small"))
    assert "small' holds 3 sequences (documents), so --split 969,30,1 leaves its valid part empty" in msg
    assert "a' holds" not in msg  # 1000 sequences: 969 / 30 / 1
    # 100 sequences: a tenth of one for test.
    write_indexed(files / "hundred", 100)
    msg = problems(files, "--data-path", str(files / "hundred"))
    assert "hundred' holds 100 sequences (documents), so --split 969,30,1 leaves its test part empty" in msg
    assert "or 0 to have no test split" in msg
    finalize(files, "--data-path", "0.5", str(files / "a"), "0.5", str(files / "small"),
             "--split", "1,1,1")
    # Splits that are not read do not matter: no validation, no test evaluation.
    finalize(files, "--data-path", str(files / "small"), "--eval-iters", "0")
    (files / "bad.bin").write_bytes(b"")
    (files / "bad.idx").write_bytes(b"junk")
    assert "bad.idx has 4 bytes, less than the 34-byte header" in problems(
        files, "--data-path", str(files / "bad"))


def test_cuda_graph_rejects_what_one_graph_cannot_capture(files, monkeypatch):
    """--cuda-graph-impl local: each layout the capture cannot hold is named with its fix."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # judge the layout, not this host
    args = finalize(files, "--fp4-recipe", "averis", "--cuda-graph-impl", "local",
                    "--tensor-model-parallel-size", "2", "--sequence-parallel", world_size=4)
    assert (args.cuda_graph_impl, args.cuda_graph_scope, args.cuda_graph_warmup_steps) == (
        "local", "full_iteration", 3)
    text = problems(files, "--cuda-graph-impl", "local", "--pipeline-model-parallel-size", "2",
                    "--recompute-granularity", "selective", "--overlap-grad-reduce",
                    "--cuda-graph-warmup-steps", "0", world_size=2)
    assert "use --pipeline-model-parallel-size 1" in text
    assert "drop --recompute-granularity" in text
    assert "drop --overlap-grad-reduce" in text
    assert "--cuda-graph-warmup-steps must be >= 1, got 0" in text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ("--cuda-graph-impl local is refused: no CUDA device (CPU run); drop --cuda-graph-impl "
            "local or run on a GPU") in problems(files, "--cuda-graph-impl", "local")
    with pytest.raises(SystemExit):  # argparse: the only scope there is
        parse_args(argv(files, "--cuda-graph-scope", "attn"))
