"""Atomic checkpoint commit: a crash at any point leaves `latest` on a complete checkpoint."""

import json
import os

import pytest

from megatron_averis.training import checkpoint_dirs as cd


def write_checkpoint_files(path, payload="x"):
    """What dist_checkpointing writes (enough for is_checkpoint_dir)."""
    with open(os.path.join(path, "metadata.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(path, "__0_0.distcp"), "w") as f:
        f.write(payload)


def save(root, iteration, payload="x"):
    tmp = cd.prepare_temp_dir(str(root), iteration)
    write_checkpoint_files(tmp, payload)
    return cd.commit(str(root), iteration, {"iteration": iteration, "consumed_train_samples": 8 * iteration})


def test_commit_moves_tracker_last(tmp_path):
    assert cd.find_latest_checkpoint(str(tmp_path)) is None
    first = save(tmp_path, 10)
    assert first == str(tmp_path / "iter_0000010")
    assert cd.find_latest_checkpoint(str(tmp_path)) == (10, first)
    assert cd.read_train_state(first)["consumed_train_samples"] == 80
    second = save(tmp_path, 20)
    assert cd.find_latest_checkpoint(str(tmp_path)) == (20, second)
    assert sorted(os.listdir(tmp_path)) == sorted([cd.TRACKER, "iter_0000010", "iter_0000020"])


def test_crash_during_write_keeps_previous_latest(tmp_path):
    good = save(tmp_path, 10)
    # A save of step 20 dies half-way: files in the temp dir, never committed.
    tmp = cd.prepare_temp_dir(str(tmp_path), 20)
    with open(os.path.join(tmp, "__0_0.distcp"), "w") as f:
        f.write("partial")
    assert cd.find_latest_checkpoint(str(tmp_path)) == (10, good)
    assert cd.find_checkpoint(str(tmp_path)) == (10, good)
    # The next save clears the leftover and completes.
    third = save(tmp_path, 30)
    assert not os.path.exists(tmp)
    assert cd.find_latest_checkpoint(str(tmp_path)) == (30, third)


def test_crash_between_rename_and_tracker_keeps_previous_latest(tmp_path, monkeypatch):
    good = save(tmp_path, 10)

    def die(*a, **k):
        raise OSError("killed")

    monkeypatch.setattr(cd, "_write_json_atomic", die)
    with pytest.raises(OSError):
        save(tmp_path, 20)
    monkeypatch.undo()
    assert cd.find_latest_checkpoint(str(tmp_path)) == (10, good)
    with open(tmp_path / cd.TRACKER) as f:
        assert json.load(f) == {"iteration": 10, "dir": "iter_0000010"}


def test_same_iteration_never_overwrites(tmp_path):
    first = save(tmp_path, 10, payload="old")
    second = save(tmp_path, 10, payload="new")
    assert second == str(tmp_path / "iter_0000010.v2")
    with open(os.path.join(first, "__0_0.distcp")) as f:
        assert f.read() == "old"
    assert cd.find_latest_checkpoint(str(tmp_path)) == (10, second)
    # --ckpt-step picks the newest complete version of that iteration.
    assert cd.find_checkpoint(str(tmp_path), 10) == (10, second)


def test_find_checkpoint_forms(tmp_path):
    assert cd.find_checkpoint(str(tmp_path / "empty")) is None  # --load X --save X, first launch
    ten = save(tmp_path, 10)
    save(tmp_path, 20)
    assert cd.find_checkpoint(str(tmp_path), 10) == (10, ten)
    assert cd.find_checkpoint(ten) == (10, ten)  # a checkpoint directory itself
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of iteration 15"):
        cd.find_checkpoint(str(tmp_path), 15)
    with pytest.raises(FileNotFoundError, match="not --ckpt-step 20"):
        cd.find_checkpoint(ten, 20)
