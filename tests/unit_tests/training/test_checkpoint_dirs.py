"""Atomic checkpoint commit in Megatron-LM's layout: a crash at any point leaves the tracker on a
complete checkpoint; --load refuses directories of another layout."""

import os

import pytest

from megatron_averis.training import checkpoint_dirs as cd


def write_checkpoint_files(path, payload="x"):
    """What dist_checkpointing writes (enough for is_checkpoint_dir)."""
    for name, text in (("metadata.json", "{}"), ("common.pt", "c"), ("__0_0.distcp", payload)):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)


def save(root, iteration, payload="x"):
    tmp = cd.prepare_temp_dir(str(root), iteration)
    write_checkpoint_files(tmp, payload)
    return cd.commit(str(root), iteration)


def tracker_text(root) -> str:
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        return f.read()


def test_commit_moves_tracker_last(tmp_path):
    assert cd.find_latest_checkpoint(str(tmp_path)) is None
    first = save(tmp_path, 10)
    assert first == str(tmp_path / "iter_0000010")
    assert cd.find_latest_checkpoint(str(tmp_path)) == (10, first)
    assert tracker_text(tmp_path) == "10\n"  # Megatron-LM's tracker: the iteration as text
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

    monkeypatch.setattr(cd, "_write_text_atomic", die)
    with pytest.raises(OSError):
        save(tmp_path, 20)
    monkeypatch.undo()
    assert cd.find_latest_checkpoint(str(tmp_path)) == (10, good)
    assert tracker_text(tmp_path) == "10\n"


def read_payload(path):
    with open(os.path.join(path, "__0_0.distcp")) as f:
        return f.read()


def test_same_iteration_is_replaced_after_the_new_one_is_complete(tmp_path, monkeypatch):
    first = save(tmp_path, 10, payload="old")
    assert save(tmp_path, 10, payload="new") == first
    assert read_payload(first) == "new"
    assert sorted(os.listdir(tmp_path)) == sorted([cd.TRACKER, "iter_0000010"])
    # A crash between moving the old one aside and moving the new one in: the old one is found.
    real_rename = os.rename

    def rename(src, dst):
        if src.endswith(".tmp"):
            raise OSError("killed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        save(tmp_path, 10, payload="newer")
    monkeypatch.undo()
    found = cd.find_latest_checkpoint(str(tmp_path))
    assert found[0] == 10 and read_payload(found[1]) == "new"


def test_find_checkpoint_forms(tmp_path):
    assert cd.find_checkpoint(str(tmp_path / "empty")) is None  # --load X --save X, first launch
    ten = save(tmp_path, 10)
    save(tmp_path, 20)
    assert cd.find_checkpoint(str(tmp_path), 10) == (10, ten)
    assert cd.find_checkpoint(ten) == (None, ten)  # a checkpoint directory itself (iteration
    # from its common state)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of iteration 15"):
        cd.find_checkpoint(str(tmp_path), 15)


def test_unrecognised_layouts_are_refused_not_started_afresh(tmp_path):
    logs = tmp_path / "logs"  # a --save directory whose first launch wrote logs, no checkpoint
    logs.mkdir()
    (logs / "metrics.jsonl").write_text("{}")
    (logs / "iter_0000005.tmp").mkdir()  # a save that crashed
    assert cd.find_checkpoint(str(logs)) is None
    old = tmp_path / "old"  # megatron-averis before the Megatron-LM layout
    old.mkdir()
    (old / "latest_checkpoint.json").write_text('{"iteration": 5, "dir": "iter_0000005"}')
    with pytest.raises(cd.UnrecognisedCheckpoint, match="point --load at one of its iter_"):
        cd.find_checkpoint(str(old))
    legacy = tmp_path / "legacy"  # Megatron-LM's --ckpt-format torch, tracker lost
    (legacy / "iter_0000005" / "mp_rank_00").mkdir(parents=True)
    with pytest.raises(cd.UnrecognisedCheckpoint, match="no latest_checkpointed_iteration.txt"):
        cd.find_checkpoint(str(legacy))
    (legacy / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(cd.UnrecognisedCheckpoint, match="iter_0000005 is not a complete "
                       "checkpoint: it is in Megatron-LM's --ckpt-format torch"):
        cd.find_checkpoint(str(legacy))


def test_a_damaged_tracker_is_told_from_another_layout(tmp_path):
    """Damage (loading then names the newest intact checkpoint), not an unrecognised layout."""
    save(tmp_path, 10)
    tracker = tmp_path / cd.TRACKER
    tracker.write_text('{"iter')
    with pytest.raises(cd.TrackerDamaged, match=f"^{tracker} holds '{{\"iter', not an iteration"):
        cd.find_checkpoint(str(tmp_path))
    tracker.write_bytes(b"\xff\xfe")
    with pytest.raises(cd.TrackerDamaged, match="cannot be read \\(UnicodeDecodeError"):
        cd.find_checkpoint(str(tmp_path))
    tracker.write_text("20\n")  # a checkpoint deleted by hand
    with pytest.raises(cd.TrackerDamaged, match="names iteration 20, but iter_0000020 is not a "
                       "complete checkpoint$"):
        cd.find_checkpoint(str(tmp_path))


def test_committed_checkpoints_lists_what_a_lookup_finds(tmp_path):
    ten, thirty = save(tmp_path, 10), save(tmp_path, 30)
    os.rename(thirty, thirty + ".superseded")  # a crash between the two renames of a re-save
    (tmp_path / "iter_0000020.tmp").mkdir()  # never committed
    (tmp_path / "iter_0000040").mkdir()  # incomplete (no metadata)
    assert cd.committed_checkpoints(str(tmp_path)) == [(10, ten), (30, thirty + ".superseded")]
    assert cd.committed_checkpoints(str(tmp_path / "missing")) == []
    assert [cd.iteration_of(p) for p in (ten, thirty + ".superseded", str(tmp_path))] == [
        10, 30, None]
