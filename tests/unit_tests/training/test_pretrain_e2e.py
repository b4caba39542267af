"""The whole program on CPU (gloo): training, validation, logging, checkpoint save and exact resume,
with 1 and 2 processes."""

import json
import math
import os
import re

import pytest
from pretrain_launcher import data_args, launch

from megatron_averis.training.presets import PRESETS, parameter_counts

pytestmark = pytest.mark.slow

ITERS = 4
COMMON = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
          "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr", "2e-3",
          "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--eval-interval", "2",
          "--eval-iters", "1", "--log-interval", "1",
          "--seed", "7", "--wandb-mode", "disabled"]
# Every float a resumed run must reproduce bit for bit.
EXACT = ("loss", "grad_norm", "lr")


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """One process, 4 steps, checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("ref")
    save = str(root / "ckpt")
    return launch(COMMON + data_args(corpus) + ["--save", save, "--save-interval", "2"],
                  nproc=1, log_dir=save)


def test_run_logs_progress_metrics_config_and_tensorboard(reference_run, corpus):
    run = reference_run
    train = run.by_step("train")
    assert sorted(train) == list(range(1, ITERS + 1))
    for step, r in train.items():
        for key in ("loss", "lr", "grad_norm", "tokens_per_second", "tflops_per_gpu", "memory_gib",
                    "eta_seconds", "seconds_per_iteration"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (step, key, r[key])
        assert r["consumed_samples"] == 8 * step and r["consumed_tokens"] == 8 * 32 * step
        assert r["mfu"] is None  # no peak on CPU unless --peak-tflops
    # Freshly initialised: the loss of the first step is close to ln(vocabulary).
    assert abs(train[1]["loss"] - math.log(1024)) < 0.3
    assert train[ITERS]["eta_seconds"] == 0
    # LR: warm-up from 0 over 1 step, then cosine to 0 over the remaining 3 (used before each step).
    assert train[1]["lr"] == 0.0 and train[2]["lr"] == pytest.approx(2e-3)
    assert train[3]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi / 3)))
    valid = run.by_step("valid")
    assert sorted(valid) == [2, 4] and valid[4]["loss"] < valid[2]["loss"] < train[1]["loss"]
    assert valid[4]["ppl"] == pytest.approx(math.exp(valid[4]["loss"]), rel=1e-6)

    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("step 3/4"))
    assert re.fullmatch(r"step 3/4 \| loss \d+\.\d{4} \| lr [\d.e+-]+ \| grad-norm [\d.]+ \| "
                        r"[\d,]+ tok/s \| [\d.]+ TFLOP/s/rank \| mem [\d.]+ GiB \| [\d.]+ s/it \| "
                        r"ETA \d+:\d\d:\d\d", line), line

    start = run.records("start")[0]["config"]
    counts = parameter_counts(PRESETS["tiny"].arch, 1024)
    assert start["parameters"] == counts and start["rank0_local_parameters"] == counts["total"]
    assert "recipe fp32: no quantized GEMMs (FP32)" in run.stdout  # COMMON has no --bf16
    assert start["recipe"]["name"] == "fp32" and start["seed"] == 7 and start["padded_vocab_size"] == 1024
    with open(os.path.join(run.log_dir, "config.json")) as f:
        assert json.load(f)["global_batch_size"] == 8
    tb = os.path.join(run.log_dir, "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))

    # Megatron-LM's layout: its tracker, and its common state (iteration, args, schedule).
    with open(os.path.join(run.log_dir, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "4"
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(os.path.join(run.log_dir, "iter_0000002"))
    assert (common["iteration"], common["checkpoint_version"]) == (2, 3.0)
    assert (common["args"].consumed_train_samples, common["args"].num_layers) == (16, 2)
    assert common["opt_param_scheduler"]["num_steps"] == 16  # samples, as Megatron-LM counts
    assert [r["step"] for r in run.records("checkpoint")] == [2, 4]


def test_resume_reproduces_the_uninterrupted_run(reference_run, corpus, tmp_path):
    resumed = launch(COMMON + data_args(corpus) + ["--load", reference_run.log_dir, "--ckpt-step", "2",
                                                   "--save", str(tmp_path / "ckpt")],
                     nproc=1, log_dir=str(tmp_path / "ckpt"))
    assert "resumed from" in resumed.stdout and "at iteration 2" in resumed.stdout
    ref, got = reference_run.by_step("train"), resumed.by_step("train")
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert {k: got[step][k] for k in EXACT} == {k: ref[step][k] for k in EXACT}
    assert got[4]["consumed_samples"] == ref[4]["consumed_samples"]
    assert resumed.by_step("valid")[4]["loss"] == reference_run.by_step("valid")[4]["loss"]


def test_two_data_parallel_ranks_train_like_one(reference_run, corpus, tmp_path):
    """Same global batch over DP=2 (distributed optimizer, gradient reduction overlapped with the
    backward pass): the same model trajectory, up to float summation order."""
    run = launch(COMMON + data_args(corpus) + ["--use-distributed-optimizer", "--overlap-grad-reduce"],
                 nproc=2,
                 log_dir=str(tmp_path / "logs"))
    assert "world 2 = TP 1 x PP 1 x DP 2" in run.stdout
    ref, got = reference_run.by_step("train"), run.by_step("train")
    for step in range(1, ITERS + 1):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4)


def test_tensor_parallel_fp4_run_resumes_exactly(corpus, tmp_path):
    """TP=2 + sequence parallelism under the Averis recipe (stochastic rounding on gradients):
    resuming restores the stochastic-rounding streams too."""
    args = COMMON + data_args(corpus) + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                         "--fp4-recipe", "averis", "--global-batch-size", "4",
                                         "--eval-iters", "0"]  # validation: covered above
    full = launch(args + ["--save", str(tmp_path / "a"), "--save-interval", "2"], nproc=2,
                  log_dir=str(tmp_path / "a"))
    assert "recipe averis" in full.stdout and "TP 2 x PP 1 x DP 1 + SP" in full.stdout
    resumed = launch(args + ["--load", str(tmp_path / "a"), "--ckpt-step", "2",
                             "--save", str(tmp_path / "b")], nproc=2, log_dir=str(tmp_path / "b"))
    ref, got = full.by_step("train"), resumed.by_step("train")
    assert ref[1]["loss"] == pytest.approx(math.log(1024), abs=0.3)
    for step in (3, 4):
        assert {k: got[step][k] for k in EXACT} == {k: ref[step][k] for k in EXACT}


@pytest.mark.parametrize("variant,nproc", [
    # BF16 parameters with FP32 main copies, the gathered checkpoint format.
    # Also the path of --deterministic-mode (strict torch determinism must not raise on CPU).
    (["--fp4-recipe", "averis", "--dist-ckpt-optim-fully-reshardable", "--deterministic-mode"], 1),
    # FP32 parameters (the main parameters are views of them), the default format, state sharded
    # over two data-parallel ranks.
    ([], 2),
], ids=["bf16-averis-fully_reshardable", "fp32-dp_reshardable-dp2"])
def test_distributed_optimizer_run_resumes(corpus, tmp_path, variant, nproc):
    """Every step after a resume equals the uninterrupted run. The loss of the first resumed step
    only sees the loaded weights; the later ones also see the first update, so they catch Adam
    state restored wrongly (megatron-core 0.16 without Apex/TE loses the Adam step)."""
    args = COMMON + data_args(corpus) + ["--global-batch-size", "4", "--use-distributed-optimizer",
                                         "--eval-iters", "0", *variant]
    full = launch(args + ["--save", str(tmp_path / "a"), "--save-interval", "2"],
                  nproc=nproc, log_dir=str(tmp_path / "a"))
    resumed = launch(args + ["--load", str(tmp_path / "a"), "--ckpt-step", "2",
                             "--save", str(tmp_path / "b")], nproc=nproc, log_dir=str(tmp_path / "b"))
    assert "distributed optimizer" in full.stdout and f"DP {nproc}" in full.stdout
    assert "at iteration 2" in resumed.stdout
    ref, got = full.by_step("train"), resumed.by_step("train")
    assert sorted(got) == list(range(3, ITERS + 1))
    for step in got:
        assert {k: got[step][k] for k in EXACT} == {k: ref[step][k] for k in EXACT}, step


def test_mock_data_and_exit_duration(tmp_path):
    """Megatron-LM's --mock-data with its NullTokenizer, and --exit-duration-in-mins: the first
    step already runs past the limit, so the run saves and stops there."""
    out = str(tmp_path / "mock")
    run = launch(COMMON + ["--mock-data", "--vocab-size", "1000", "--train-iters", "50",
                           "--save", out, "--exit-duration-in-mins", "1e-6"], nproc=1, log_dir=out)
    assert "vocabulary 1001 from NullTokenizer" in run.stdout  # N ids + end of document
    assert "--exit-duration-in-mins reached: saving and stopping at step 1" in run.stdout
    assert sorted(run.by_step("train")) == [1]
    with open(os.path.join(out, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "1"
