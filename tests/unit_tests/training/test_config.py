"""The typed configuration: every finalized flag lands in exactly one field (or is folded into
one at finalize), it is built once from the stored Megatron-LM command, and the trainer's
modules read it rather than the argparse namespace."""

import ast
import dataclasses
import os

import pytest
from test_megatron_command import stored_command

from megatron_averis.training import loop
from megatron_averis.training.arguments import finalize_args, parse_args
from megatron_averis.training.config import (TrainingConfig, field_flags, folded_at_finalize,
                                             ModelConfig)

TRAINING = os.path.join(os.path.dirname(loop.__file__))
# The trainer and the helpers it builds with: none of them may take the argparse namespace.
TRAINER_MODULES = ("loop.py", "optim.py", "data.py", "checkpointing.py", "writers.py",
                   "divergence.py", "cuda_graph.py", "distributed.py", "metrics.py")


def test_every_finalized_flag_has_exactly_one_home(tmp_path):
    args = finalize_args(parse_args(stored_command(tmp_path)), 1)
    homes = field_flags()  # raises if a flag is a field of two sections
    folded = folded_at_finalize()
    assert not set(homes) & folded
    derived = {"tokenizer_vocab_size", "padded_vocab_size"}  # set from the loaded tokenizer
    assert set(vars(args)) | derived == set(homes) | folded, (
        "a new flag needs a field in training/config.py, or a place in folded_at_finalize()")


def test_config_is_built_once_from_the_stored_megatron_command(tmp_path, monkeypatch):
    calls = []
    real = TrainingConfig.from_args.__func__

    def counting(cls, args, vocab):
        calls.append(vocab)
        return real(cls, args, vocab)

    monkeypatch.setattr(TrainingConfig, "from_args", classmethod(counting))
    captured = {}
    monkeypatch.setattr(loop, "dry_run_report", lambda config: captured.setdefault("c", config)
                        and "dry run")
    assert loop.main(stored_command(tmp_path, add=["--dry-run"])) == 0
    assert calls == [151643 + 1]  # NullTokenizer --vocab-size 151643 + end of document
    config = captured["c"]
    # The command's values, by hand from commands/megatron_lm_qwen3_0.6b.sh.
    assert config.model.arch.num_layers == 28 and config.model.padded_vocab_size == 151936
    assert config.model.recipe.name == "averis" and config.model.bf16
    assert config.batch.global_batch_size == 128 and config.batch.train_iters == 20000
    assert config.schedule.lr_schedule_samples["warmup"] == 25600
    assert config.data.tokenizer_type == "NullTokenizer" and config.data.mock_data
    assert config.execution.dry_run and config.flags["padded_vocab_size"] == 151936
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch.seq_length = 1
    with pytest.raises(TypeError):
        config.schedule.lr_schedule_samples["warmup"] = 0


def _namespace_reads(path: str) -> list[str]:
    """`args.x` / `self.args` / a parameter named args in a module: the namespace's spellings."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "args":
            found.append(f"line {node.lineno}: args")
        elif isinstance(node, ast.Attribute) and node.attr == "args":
            found.append(f"line {node.lineno}: .args")
        elif isinstance(node, ast.arg) and node.arg == "args":
            found.append(f"line {node.lineno}: parameter args")
    return found


@pytest.mark.parametrize("module", TRAINER_MODULES)
def test_trainer_modules_do_not_read_the_namespace(module):
    path = os.path.join(TRAINING, module)
    reads = _namespace_reads(path)
    if module == "loop.py":  # main() parses and finalizes the command line, then builds the config
        start = next(n.lineno for n in ast.parse(open(path).read()).body
                     if isinstance(n, ast.FunctionDef) and n.name == "main")
        reads = [r for r in reads if int(r.split()[1].rstrip(":")) < start]
    assert reads == []


def test_model_config_is_the_model_section(tmp_path):
    args = finalize_args(parse_args(stored_command(tmp_path)), 1)
    config = TrainingConfig.from_args(args, 1000)
    assert isinstance(config.model, ModelConfig) and config.model.padded_vocab_size == 1187  # 1000 up to a multiple of 1187


def test_git_state_names_the_checkout_and_its_uncommitted_changes():
    import subprocess

    from megatron_averis.training.loop import git_state

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    clean = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode == 0
    assert git_state() == {"git_commit": head.stdout.strip(), "git_dirty": not clean}


def test_implementation_flags_are_recipe_fields_in_the_saved_config(tmp_path):
    """--fp4-token-sum / --fp4-gemm land in the recipe (over --fp4-recipe-override), and the
    run's saved configuration (config.flags: config.json, metrics.jsonl's first record,
    checkpoints) records them; a saved recipe loads back with them."""
    from megatron_averis.diagnostics.checkpoint import recipe_from_dict

    default = TrainingConfig.from_args(finalize_args(parse_args(stored_command(tmp_path)), 1), 1000)
    assert (default.model.recipe.token_sum, default.model.recipe.fp4_gemm) == ("pairwise", "dequant")
    assert default.flags["recipe"]["token_sum"] == "pairwise"
    argv = stored_command(tmp_path, add=["--fp4-recipe-override", "token_sum=pairwise",
                                         "--fp4-token-sum", "torch", "--fp4-gemm", "fused"])
    config = TrainingConfig.from_args(finalize_args(parse_args(argv), 1), 1000)
    recipe = config.model.recipe
    assert (recipe.name, recipe.token_sum, recipe.fp4_gemm) == ("averis", "torch", "fused")
    saved = config.flags["recipe"]
    assert (saved["token_sum"], saved["fp4_gemm"]) == ("torch", "fused")
    assert (config.flags["fp4_token_sum"], config.flags["fp4_gemm"]) == ("torch", "fused")
    assert recipe_from_dict(dict(saved)) == recipe


def test_implementation_flags_need_an_fp4_recipe(tmp_path):
    from test_megatron_command import refusal

    argv = stored_command(tmp_path, drop=("--fp4-recipe", "--fp4-format"),
                          add=["--fp4-gemm", "fused"])
    assert "--fp4-gemm change an FP4 recipe" in refusal(argv)
