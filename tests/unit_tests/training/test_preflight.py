"""Start-up checks of the files a run touches: datasets (both --data-path and the per-split flags),
--load, and a writable --save with room for a checkpoint. Expected numbers come from the files
themselves (os.path.getsize, the documents written), not from the checker."""

import os

import numpy as np
import pytest
from test_arguments import argv, files, problems, write_indexed  # noqa: F401 (fixture)

from megatron_averis.training import checkpoint_integrity
from megatron_averis.training.arguments import finalize_args, parse_args
from megatron_averis.training.preflight import checkpoint_bytes, output_problems
from megatron_averis.training.presets import PRESETS

REBUILD = "rebuild it with tools/preprocess_data.py"


def split_argv(files, train, valid):
    """The per-split flags, as quickstart.sh and train.sh pass them."""
    base = argv(files)
    base = base[:base.index("--data-path")]
    return base + ["--train-data-path", str(train), "--valid-data-path", str(valid)]


def split_problems(files, train, valid, *extra) -> str:
    from megatron_averis.training.arguments import ConfigError

    with pytest.raises(ConfigError) as e:
        finalize_args(parse_args(split_argv(files, train, valid) + list(extra)), 1)
    return "\n".join(e.value.problems)


def test_intact_datasets_pass(files):
    finalize_args(parse_args(split_argv(files, files / "a", files / "b")), 1)


@pytest.mark.parametrize("flag", ["--train-data-path", "--valid-data-path"])
def test_truncated_bin_is_named_for_either_flag(files, flag):
    bin_path = files / "a.bin"
    full = os.path.getsize(bin_path)
    os.truncate(bin_path, full // 2)
    train, valid = (files / "a", files / "b") if flag == "--train-data-path" else (files / "b", files / "a")
    msg = split_problems(files, train, valid)
    assert msg == (f"{flag}: {bin_path} has {full // 2:,} bytes but {files / 'a.idx'} describes "
                   f"{full:,} (truncated); {REBUILD}")


def test_truncated_empty_and_garbage_index(files):
    idx = files / "a.idx"
    size = os.path.getsize(idx)
    # 1000 documents of 5..11 tokens: the index holds 34 header bytes + 12 per sequence + 8 per
    # document boundary (1001).
    assert size == 34 + 12 * 1000 + 8 * 1001
    os.truncate(idx, size - 100)
    assert split_problems(files, files / "a", files / "b") == (
        f"--train-data-path: {idx} has {size - 100:,} bytes but its header (1,000 sequences, 1,001 "
        f"document boundaries) needs {size:,} (truncated or overwritten); {REBUILD}")
    idx.write_bytes(b"")
    assert split_problems(files, files / "a", files / "b") == (
        f"--train-data-path: {idx} has 0 bytes, less than the 34-byte header (empty or truncated); "
        f"{REBUILD}")
    idx.write_bytes(b"<html>not an index</html>" * 4)
    assert split_problems(files, files / "a", files / "b") == (
        f"--train-data-path: {idx} is not a megatron-core index (header b'<html>not', version "
        f"{int.from_bytes(b' an inde', 'little')}, dtype code {ord('x')}); {REBUILD}")


def test_corrupted_offsets_and_mismatched_pair(files):
    idx = files / "a.idx"
    data = bytearray(idx.read_bytes())
    lengths = np.frombuffer(bytes(data[34:34 + 4 * 1000]), np.int32)
    assert lengths.sum() * 2 == os.path.getsize(files / "a.bin")  # uint16 tokens
    data[34 + 4 * 1000 + 8 * 5] ^= 0xFF  # the sixth sequence's byte offset
    idx.write_bytes(bytes(data))
    assert split_problems(files, files / "a", files / "b") == (
        f"--train-data-path: {idx}: its sequence lengths and offsets disagree (corrupted); {REBUILD}")
    write_indexed(files / "c", 1000)
    os.replace(files / "small.bin", files / "c.bin")  # a .bin of another dataset
    msg = split_problems(files, files / "c", files / "b")
    assert f"{files / 'c.bin'} has " in msg and "(truncated)" in msg


def test_data_path_is_checked_too(files):
    with open(files / "a.bin", "ab") as f:
        f.write(b"\0\0")
    msg = problems(files)
    assert msg.startswith(f"--data-path: {files / 'a.bin'} has ") and "the files do not belong together" in msg


def test_load_must_exist_unless_it_is_save_or_a_fresh_start_is_asked(files, tmp_path):
    gone, save = str(tmp_path / "gone"), str(tmp_path / "save")
    assert problems(files, "--load", gone, "--save", save) == (
        f"--load {gone!r} does not exist, so the run would start from scratch; correct the path, "
        "give --load the --save directory to resume from it when it has a checkpoint, or add "
        "--allow-fresh-start to start from scratch")
    os.makedirs(gone)
    assert "holds no checkpoint, so the run would start from scratch" in problems(
        files, "--load", gone, "--save", save)
    finalize_args(parse_args(argv(files, "--load", save, "--save", save)), 1)  # resume-or-start
    finalize_args(parse_args(argv(files, "--load", gone, "--save", save, "--allow-fresh-start")), 1)


def test_missing_ckpt_step_lists_the_checkpoints(files, tmp_path):
    from test_checkpoint_dirs import save

    save(tmp_path, 10)
    save(tmp_path, 20)
    assert problems(files, "--load", str(tmp_path), "--ckpt-step", "15") == (
        f"--load {str(tmp_path)!r} has no complete checkpoint of iteration 15 (--ckpt-step); "
        "complete checkpoints there: 10, 20")
    # A damaged tracker passes start-up: loading names the newest intact checkpoint (or loads it
    # under --ckpt-fallback), which needs every rank to verify candidates.
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage")
    finalize_args(parse_args(argv(files, "--load", str(tmp_path))), 1)


def finalized(files, tmp_path, *extra):
    args = finalize_args(parse_args(argv(files, "--model-preset", "tiny", "--seq-length", "32",
                                         *extra)), 1)
    return args


@pytest.mark.parametrize("dry_run", [False, True])
def test_save_must_be_writable(files, tmp_path, dry_run):
    """Checked by writing a file, as the run will; by asking the OS under --dry-run, which writes
    nothing."""
    extra = ["--dry-run"] if dry_run else []
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = finalized(files, tmp_path, "--save", str(blocker / "ckpt"), *extra)
    assert output_problems(args, 1000) == [
        f"--save {str(blocker / 'ckpt')!r} is not writable (NotADirectoryError: Not a directory); "
        "choose a directory you can write to, or fix its permissions"]
    if os.geteuid() != 0:  # permissions do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        args = finalized(files, tmp_path, "--save", str(locked / "ckpt"), *extra)
        assert "is not writable (PermissionError" in output_problems(args, 1000)[0]
    args = finalized(files, tmp_path, "--save", str(tmp_path / "ok" / "ckpt"), *extra)
    assert output_problems(args, 1000) == []
    assert (not (tmp_path / "ok").exists() if dry_run
            else os.listdir(tmp_path / "ok" / "ckpt") == [])


def test_save_needs_room_for_one_checkpoint(files, tmp_path, monkeypatch):
    args = finalized(files, tmp_path, "--save", str(tmp_path / "ckpt"), "--bf16")
    # tiny: vocabulary 1000 padded to 1024; BF16 weights + FP32 main copy + 2 Adam moments.
    tiny = PRESETS["tiny"].arch
    params = 1024 * tiny.hidden_size + tiny.num_layers * (
        tiny.hidden_size * (tiny.num_attention_heads + 2 * tiny.num_query_groups) * tiny.kv_channels
        + tiny.num_attention_heads * tiny.kv_channels * tiny.hidden_size + 2 * tiny.kv_channels
        + 3 * tiny.hidden_size * tiny.ffn_hidden_size + 2 * tiny.hidden_size) + tiny.hidden_size
    need = int(params * (2 + 4 + 4 + 4) * 1.1)
    assert checkpoint_bytes(tiny, 1024, bf16=True) == need
    usage = type("usage", (), {"free": need - 1})
    monkeypatch.setattr(checkpoint_integrity.shutil, "disk_usage", lambda path: usage)
    assert output_problems(args, 1000) == [
        f"--save {str(tmp_path / 'ckpt')!r}: its file system has {need - 1:,} bytes free but one "
        f"checkpoint of this model needs about {need:,}; free space or choose another --save"]
    usage.free = need
    assert output_problems(args, 1000) == []
