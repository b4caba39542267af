"""Nothing lost when things go wrong (CPU, gloo, tiny preset): damaged checkpoints and trackers,
a disk that fills during a save, an unwritable --save, divergence, and kill -9 at random points
and inside a save. Each case checks the exact message and that the previous checkpoint is intact
and latest with no partial files left."""

import os
import random
import re
import resource
import shutil
import signal
import subprocess
import time

import pytest
from pretrain_launcher import command, data_args, launch

from megatron_averis.training import checkpoint_dirs as cd
from megatron_averis.training import checkpoint_integrity as integrity
from megatron_averis.training.preflight import checkpoint_bytes
from megatron_averis.training.presets import PRESETS

pytestmark = pytest.mark.slow

ITERS = 8
COMMON = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--lr", "2e-3", "--lr-warmup-iters", "1",
          "--eval-iters", "0", "--log-interval", "1", "--seed", "11", "--wandb-mode", "disabled"]
EXACT = ("loss", "grad_norm", "lr")
# The first update at LR 100 multiplies the loss by ~10^4 (no warm-up), then a checkpoint per step.
BLOW_UP = ("--lr", "100", "--lr-warmup-iters", "0", "--save-interval", "1")


def args(corpus, save, *extra, iters=ITERS):
    return COMMON + data_args(corpus) + ["--train-iters", str(iters), "--save", str(save),
                                         "--load", str(save), "--save-interval", "2", *extra]


def tracked(root) -> int:
    return cd.find_latest_checkpoint(str(root))[0]


def leftovers(root) -> list[str]:
    return [n for n in os.listdir(root) if n.endswith(".tmp")]


def assert_same_steps(got: dict, ref: dict, steps):
    for step in steps:
        assert {k: got[step][k] for k in EXACT} == {k: ref[step][k] for k in EXACT}, step


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run: 8 steps, checkpoints at 2, 4, 6, 8."""
    save = tmp_path_factory.mktemp("ref") / "ckpt"
    return launch(args(corpus, save), nproc=1, log_dir=str(save))


def copy_run(reference, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(reference.log_dir, dst)
    return dst


def test_every_checkpoint_has_a_verified_manifest(reference):
    root = reference.log_dir
    assert [it for it, _ in cd.committed_checkpoints(root)] == [2, 4, 6, 8]
    path = os.path.join(root, "iter_0000008")
    assert integrity.check(path) == []
    # The size estimate of start-up's free-space check covers a real checkpoint, within 20%.
    written = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    estimate = checkpoint_bytes(PRESETS["tiny"].arch, 1024, bf16=False)
    assert written <= estimate <= 1.2 * written


def test_damaged_checkpoint_and_tracker_are_named_and_fallback_resumes_exactly(
        reference, corpus, tmp_path):
    root = copy_run(reference, tmp_path)
    shard = root / "iter_0000008" / "__0_0.distcp"
    size = os.path.getsize(shard)
    os.truncate(shard, size // 2)
    run = launch(args(corpus, root, "--ckpt-step", "8"), nproc=1, log_dir=str(root), returncode=1)
    assert (f"error: checkpoint {root}/iter_0000008 is damaged: {shard} has {size // 2:,} bytes, the "
            f"manifest records {size:,} (truncated or overwritten). The newest intact earlier "
            f"checkpoint is iteration 6 ({root}/iter_0000006): resume it with --ckpt-step 6, or add "
            "--ckpt-fallback to fall back automatically") in run.stderr
    assert "[rank0]: Traceback" not in run.stderr and tracked(root) == 8

    # With the tracker damaged too, the newest intact checkpoint of all is offered.
    tracker = root / cd.TRACKER
    tracker.write_text('{"iter')
    run = launch(args(corpus, root), nproc=1, log_dir=str(root), returncode=1)
    assert (f"error: checkpoint {tracker} is damaged: {tracker} holds '{{\"iter', not an iteration "
            f"number. The newest intact checkpoint is iteration 6 ({root}/iter_0000006): resume it "
            "with --ckpt-step 6") in run.stderr

    # Asked for, the fall-back resumes iteration 6 and reproduces steps 7-8 bit for bit.
    run = launch(args(corpus, root, "--ckpt-fallback"), nproc=1, log_dir=str(root))
    assert f"loading iteration 6 ({root}/iter_0000006) instead (--ckpt-fallback)" in run.stdout
    assert_same_steps(run.by_step("train"), reference.by_step("train"), (7, 8))
    # The new checkpoint of step 8 replaced the damaged one.
    assert cd.find_latest_checkpoint(str(root)) == (8, f"{root}/iter_0000008")
    assert integrity.check(f"{root}/iter_0000008") == [] and not leftovers(root)
    assert not os.path.exists(f"{root}/iter_0000008.superseded")


def _file_size_limit(limit: int):
    def apply():
        # A file-size limit makes writes fail like a full disk does, without root or a small disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_write_failure_keeps_the_previous_checkpoint_latest(reference, corpus, tmp_path):
    root = copy_run(reference, tmp_path)
    before = {f: os.path.getsize(root / "iter_0000008" / f) for f in os.listdir(root / "iter_0000008")}
    shard = max(size for name, size in before.items() if name.endswith(".distcp"))
    # Resume step 6: the save of step 8 (which would replace iter_0000008) fails.
    run = launch(args(corpus, root, "--ckpt-step", "6"), nproc=1, log_dir=str(root), returncode=1,
                 preexec_fn=_file_size_limit(shard // 2))
    need = checkpoint_bytes(PRESETS["tiny"].arch, 1024, bf16=False)
    # Where the limit cuts a write decides what the writer reports: the OS error, or torch.save's
    # "unexpected pos" (the errno lost; the message the program used to end with).
    cause = (r"(\[Errno 27\] File too large|a write came up short, unexpected pos \d+ vs \d+: the "
             r"disk is full or a limit was hit)")
    assert re.search(
        re.escape(f"error: writing the checkpoint into {root}/iter_0000008.tmp failed (") + cause
        + re.escape(f"). A checkpoint of this model needs about {need:,} bytes and the file system "
                    f"of {root} has ") + r"[\d,]+" + re.escape(
            f" bytes free. This process may write files of at most {shard // 2:,} bytes (ulimit -f)."
            " Free space (or give another --save) and resume; the partial iter_0000008.tmp was "
            f"removed, and the latest checkpoint is still iteration 8 ({root}/iter_0000008).\n"),
        run.stderr), run.stderr[-3000:]
    assert not leftovers(root) and not os.path.exists(root / "iter_0000008.superseded")
    assert cd.find_latest_checkpoint(str(root)) == (8, f"{root}/iter_0000008")
    assert {f: os.path.getsize(root / "iter_0000008" / f) for f in before} == before
    assert integrity.check(str(root / "iter_0000008")) == []
    assert [r["step"] for r in run.records("checkpoint")] == [2, 4, 6, 8]  # none for the failure


def test_unwritable_save_stops_before_training(corpus, tmp_path, capsys, monkeypatch):
    """The program's own entry point (in this process: it stops before any process group)."""
    from megatron_averis.training.loop import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    save = blocker / "ckpt"
    argv = COMMON + data_args(corpus) + ["--train-iters", "2", "--save", str(save), "--log-dir",
                                         str(tmp_path / "logs")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: invalid configuration:\n  - --save '{save}' is not writable (NotADirectoryError: "
        "Not a directory); choose a directory you can write to, or fix its permissions\n")
    assert not os.path.exists(tmp_path / "logs" / "metrics.jsonl")


def test_divergence_is_logged_skipped_then_aborted_and_never_saved(corpus, tmp_path):
    """--lr 100: every step after the first diverges. Skipped steps change no weight (their
    checkpoints hold step 1's), and the abort saves nothing."""
    from megatron_averis.diagnostics import checkpoint as ckpt

    root = tmp_path / "ckpt"
    run = launch(args(corpus, root, *BLOW_UP, "--divergence-action", "skip",
                      "--max-skipped-steps", "2"), nproc=1,
                 log_dir=str(root), returncode=1)
    div = run.records("divergence")
    assert [(d["step"], d["action"], d["last_healthy_step"]) for d in div] == [
        (2, "skip", 1), (3, "skip", 1), (4, "abort", 1)]
    first = run.by_step("train")[1]["loss"]
    assert div[0]["loss"] > 10 * first and div[0]["reasons"] == [
        f"loss {div[0]['loss']:.6g} > 10 x {first:.6g}, the median of the last 1 healthy steps"]
    assert (f"error: training diverged at step 4 ({div[2]['reasons'][0]}), 3 diverged steps in a "
            "row (--max-skipped-steps 2). The weights are those of step 1, the last healthy one "
            "(diverged updates were skipped); the latest checkpoint is iteration 3 "
            f"({root}/iter_0000003). Resume with a lower --lr "
            "(--load, --ckpt-step)") in run.stderr
    assert [it for it, _ in cd.committed_checkpoints(str(root))] == [1, 2, 3] and tracked(root) == 3
    assert not run.records("end") and not leftovers(root)
    with ckpt.single_process():
        weights = [ckpt.load_model(ckpt.find(str(root), it)).state_dict() for it in (1, 3)]
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0] if "_extra_state" not in k)


def _kill_when(proc, ready, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the fault could be injected"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert proc.wait() == -signal.SIGKILL, "the run ended before the fault could be injected"


def _spawn(corpus, root):
    cmd, env = command(args(corpus, root), nproc=1, log_dir=str(root))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def test_kill_inside_a_save_and_at_a_random_point_resumes_exactly(reference, corpus, tmp_path):
    """kill -9 of the whole process group (1) while a checkpoint is being written, (2) at a random
    moment of training; each time the relaunch resumes and reproduces the uninterrupted run."""
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    root = tmp_path / "ckpt"
    metrics = root / "metrics.jsonl"

    def steps_logged() -> int:
        return metrics.read_text().count('"event": "train"') if metrics.exists() else 0

    # (1) Inside a save: as soon as a temporary checkpoint directory appears.
    _kill_when(_spawn(corpus, root), lambda: root.exists() and any(
        n.endswith(".tmp") for n in os.listdir(root)) and steps_logged() >= 3)
    # (2) After a random number of logged steps plus a random delay.
    after = rng.randint(1, 4)  # the relaunch resumes step 2 and has 6 steps to run
    delay = rng.uniform(0.0, 0.05)
    proc = _spawn(corpus, root)
    start = steps_logged()
    _kill_when(proc, lambda: steps_logged() >= start + after and
               (time.sleep(delay) or True))
    info = f"killed after {after} more steps + {delay:.3f} s (repeat with FAULT_SEED={seed})"
    run = launch(args(corpus, root), nproc=1, log_dir=str(root))
    assert tracked(root) == ITERS and not leftovers(root), info
    assert integrity.check(str(root / "iter_0000008")) == [], info
    # Every step any launch logged equals the uninterrupted run's (the last launch's record wins).
    got, ref = run.by_step("train"), reference.by_step("train")
    assert sorted(got) == list(range(1, ITERS + 1)), info
    assert_same_steps(got, ref, got)
