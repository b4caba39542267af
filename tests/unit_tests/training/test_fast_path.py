"""The fast path at start-up: which runs `--cuda-graph-impl auto` (the launch scripts' choice)
captures and which stay eager, with the one line saying why; which fused ops run."""

import os
import subprocess

import pytest
import torch
from test_arguments import finalize, problems, write_indexed

from megatron_averis.training.arguments import finalize_args, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIG_SH = os.path.join(REPO, "examples", "pretrain", "config.sh")


@pytest.fixture
def gpu(monkeypatch):
    """Judge the configuration as on a CUDA machine, whatever this host has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def files(tmp_path):
    write_indexed(tmp_path / "a", 1000)
    (tmp_path / "tok.model").write_bytes(b"")
    return tmp_path


def eager_lines(args) -> list[str]:
    return [n for n in args.execution_notes if n.startswith("eager mode")]


def test_auto_captures_on_a_gpu_when_nothing_prevents_it(files, gpu):
    args = finalize(files, "--bf16", "--cuda-graph-impl", "auto", "--cuda-graph-warmup-steps", "2")
    assert args.cuda_graph_impl == "local"
    assert args.execution_notes == [
        "CUDA graph (--cuda-graph-impl auto): each iteration is captured after 2 eager warm-up "
        "steps and replayed; --cuda-graph-impl none for eager steps"]
    tp_sp = finalize(files, "--fp4-recipe", "averis", "--cuda-graph-impl", "auto",
                     "--tensor-model-parallel-size", "2", "--sequence-parallel", world_size=4)
    assert tp_sp.cuda_graph_impl == "local" and not eager_lines(tp_sp)


@pytest.mark.parametrize("extra, world, reason, fix", [
    (("--pipeline-model-parallel-size", "2"), 2, "pipeline parallelism (its point-to-point "
     "transfers synchronize with the host)", "use --pipeline-model-parallel-size 1"),
    (("--recompute-granularity", "selective"), 1, "--recompute-granularity selective (activation "
     "recomputation swaps RNG states on the host)", "drop --recompute-granularity"),
    (("--recompute-activations",), 1, "--recompute-granularity selective",
     "drop --recompute-granularity / --recompute-activations"),
    (("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers",
      "1"), 1, "--recompute-granularity full", "drop --recompute-granularity"),
    (("--overlap-grad-reduce",), 2, "--overlap-grad-reduce (its per-bucket reductions",
     "drop --overlap-grad-reduce"),
    (("--distributed-backend", "gloo"), 1, "--distributed-backend gloo (its collectives copy "
     "through the host)", "use --distributed-backend nccl"),
], ids=["pipeline", "selective-recompute", "recompute-activations", "full-recompute",
        "overlap-grad-reduce", "gloo"])
def test_auto_goes_eager_and_says_why(files, gpu, extra, world, reason, fix):
    args = finalize(files, "--bf16", "--cuda-graph-impl", "auto", *extra, world_size=world)
    assert args.cuda_graph_impl == "none"
    [line] = eager_lines(args)
    assert line.startswith("eager mode, no CUDA graph (--cuda-graph-impl auto): ")
    assert reason in line and f"to capture: {fix}" in line
    # The same layout under an explicit `local` is an error naming the same reason.
    assert f"--cuda-graph-impl local is refused: {reason}" in problems(
        files, "--bf16", "--cuda-graph-impl", "local", *extra, world_size=world)


def test_auto_on_cpu_is_one_eager_line_and_every_reason_is_on_it(files, cpu):
    args = finalize(files, "--cuda-graph-impl", "auto")
    assert args.cuda_graph_impl == "none"
    assert eager_lines(args) == ["eager mode, no CUDA graph (--cuda-graph-impl auto): no CUDA "
                                 "device (CPU run), to capture: run on a GPU"]
    both = finalize(files, "--cuda-graph-impl", "auto", "--pipeline-model-parallel-size", "2",
                    world_size=2)
    [line] = eager_lines(both)
    assert "no CUDA device (CPU run)" in line and "pipeline parallelism" in line


def test_auto_keeps_the_transformer_engine_route_eager(files, gpu, monkeypatch):
    from megatron_averis.te import availability

    monkeypatch.setattr(availability, "require_te", lambda: None)  # judge the flags only
    args = finalize(files, "--bf16", "--transformer-impl", "transformer_engine",
                    "--cuda-graph-impl", "auto")
    assert args.cuda_graph_impl == "none"
    [line] = eager_lines(args)
    assert "--transformer-impl transformer_engine (not verified" in line
    assert "to capture: pass --cuda-graph-impl local to try it" in line


def test_default_is_megatron_lm_eager_without_a_line(files, gpu):
    args = finalize(files, "--bf16")
    assert args.cuda_graph_impl == "none" and args.execution_notes == []
    # A warm-up count only matters once a graph is asked for.
    finalize(files, "--bf16", "--cuda-graph-warmup-steps", "0")
    assert "--cuda-graph-warmup-steps must be >= 1, got 0" in problems(
        files, "--bf16", "--cuda-graph-impl", "auto", "--cuda-graph-warmup-steps", "0")


def test_fused_op_notes(files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert finalize(files, "--bf16", "--cross-entropy-loss-fusion").execution_notes == []
    assert finalize(files, "--cross-entropy-loss-fusion").execution_notes == [
        "fused cross entropy: off for FP32 parameters (megatron-core's fused cross entropy "
        "returns BF16 gradients); the unfused FP32 one runs"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert finalize(files, "--cross-entropy-loss-fusion").execution_notes == [
        "fused RoPE, SwiGLU, cross entropy: off without CUDA (megatron-core's unfused PyTorch ops "
        "run)"]
    assert finalize(files, "--no-rope-fusion", "--no-bias-swiglu-fusion").execution_notes == []


def launch_script_argv(tmp_path, model: str, recipe: str, *extra: str, **env) -> list[str]:
    """The trainer's command line as examples/pretrain/train.sh builds it (config.sh)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for split in ("train", "valid"):
        write_indexed(data / split, 200)
    (data / "tokenizer.model").write_bytes(b"")
    script = f'source "{CONFIG_SH}" && pretrain_args "$0" "$1" && printf "%s\\0" "${{PRETRAIN_ARGS[@]}}"'
    out = subprocess.run(["bash", "-c", script, model, recipe], check=True, capture_output=True,
                         env={**os.environ, "DATA_DIR": str(data), "OUT_DIR": str(tmp_path / "runs"),
                              **env}).stdout
    return out.decode().split("\0")[:-1] + list(extra)


def launch(tmp_path, model, recipe, *extra, world_size=1, **env):
    return finalize_args(parse_args(launch_script_argv(tmp_path, model, recipe, *extra, **env)),
                         world_size)


def test_launch_scripts_take_the_fast_path_on_a_gpu(tmp_path, gpu):
    args = launch(tmp_path, "tiny", "averis")
    assert args.cuda_graph_impl == "local" and args.cross_entropy_loss_fusion
    assert args.apply_rope_fusion and args.bias_swiglu_fusion
    assert not eager_lines(args)
    # Flags after MODEL RECIPE, or CUDA_GRAPH=none, turn it off (no line: eager was asked for).
    off = launch(tmp_path, "tiny", "bf16", "--cuda-graph-impl", "none",
                 "--no-cross-entropy-loss-fusion")
    assert off.cuda_graph_impl == "none" and not off.cross_entropy_loss_fusion
    assert off.execution_notes == []
    assert launch(tmp_path, "tiny", "bf16", CUDA_GRAPH="none").cuda_graph_impl == "none"
    # A layout that cannot be captured runs eagerly with its line, instead of failing.
    pp = launch(tmp_path, "tiny", "bf16", world_size=2, PP="2")
    assert pp.cuda_graph_impl == "none" and "pipeline parallelism" in eager_lines(pp)[0]


def test_launch_scripts_on_cpu_run_eager_and_say_so(tmp_path, cpu):
    args = launch(tmp_path, "tiny", "fp32")
    assert args.cuda_graph_impl == "none"
    assert args.execution_notes == [
        "eager mode, no CUDA graph (--cuda-graph-impl auto): no CUDA device (CPU run), to "
        "capture: run on a GPU",
        "fused RoPE, SwiGLU, cross entropy: off without CUDA (megatron-core's unfused PyTorch ops "
        "run)"]


def test_dry_run_prints_the_line(tmp_path, cpu, capsys):
    from test_megatron_command import stored_command

    from megatron_averis.training.loop import main

    # Megatron-LM's Qwen3 command (with --recompute-activations and --overlap-grad-reduce)
    # asking for auto on a CPU: every reason on one line.
    assert main(stored_command(tmp_path, add=["--dry-run", "--cuda-graph-impl", "auto"])) == 0
    out = capsys.readouterr().out
    assert ("\neager mode, no CUDA graph (--cuda-graph-impl auto): no CUDA device (CPU run), to "
            "capture: run on a GPU; --recompute-granularity selective (activation recomputation "
            "swaps RNG states on the host), to capture: drop --recompute-granularity / "
            "--recompute-activations; --overlap-grad-reduce (its per-bucket reductions are "
            "launched from host-side hooks), to capture: drop --overlap-grad-reduce\n") in out
    assert '"cuda_graph_impl": "none"' in out
