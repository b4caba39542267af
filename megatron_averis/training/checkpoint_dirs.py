"""Checkpoint directory layout and its atomic commit.

    <save>/latest_checkpoint.json     {"iteration": N, "dir": "iter_000000N"}  (written last)
    <save>/iter_000000N/              a complete megatron-core dist checkpoint + train_state.json
    <save>/iter_000000N.tmp/          a checkpoint being written (never named by the tracker)

A checkpoint is written into `<name>.tmp`, renamed to its final name once every rank has finished,
and only then named in the tracker, which is replaced atomically (temporary file + os.replace).
A crash at any point leaves the tracker naming the previous complete checkpoint. A final name is
never overwritten: a second checkpoint of the same iteration (a re-run from an older checkpoint)
gets `iter_000000N.v2`, so the tracked one stays intact until the tracker moves on.

No torch.distributed here: the caller provides the barriers (see checkpointing.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil

TRACKER = "latest_checkpoint.json"
TRAIN_STATE = "train_state.json"
_TMP_SUFFIX = ".tmp"
_NAME = re.compile(r"^iter_(\d{7,})(?:\.v(\d+))?$")


def iteration_dir_name(iteration: int, version: int = 1) -> str:
    return f"iter_{iteration:07d}" + (f".v{version}" if version > 1 else "")


def temp_dir(root: str, iteration: int) -> str:
    return os.path.join(root, iteration_dir_name(iteration) + _TMP_SUFFIX)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + _TMP_SUFFIX
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def prepare_temp_dir(root: str, iteration: int) -> str:
    """(rank 0) An empty `<root>/iter_N.tmp`; leftovers of crashed saves in root are removed."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.endswith(_TMP_SUFFIX) and _NAME.match(name[: -len(_TMP_SUFFIX)]):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    path = temp_dir(root, iteration)
    os.makedirs(path)
    return path


def commit(root: str, iteration: int, train_state: dict) -> str:
    """(rank 0, after every rank finished writing into the temp dir) Make it the latest checkpoint.

    Returns the final directory.
    """
    tmp = temp_dir(root, iteration)
    with open(os.path.join(tmp, TRAIN_STATE), "w", encoding="utf-8") as f:
        json.dump(train_state, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    version = 1
    while os.path.exists(os.path.join(root, iteration_dir_name(iteration, version))):
        version += 1
    name = iteration_dir_name(iteration, version)
    final = os.path.join(root, name)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_json_atomic(os.path.join(root, TRACKER), {"iteration": iteration, "dir": name})
    return final


def is_checkpoint_dir(path: str) -> bool:
    """A committed checkpoint: dist-checkpoint metadata and our train state are both present."""
    return (os.path.isfile(os.path.join(path, "metadata.json"))
            and os.path.isfile(os.path.join(path, TRAIN_STATE)))


def find_latest_checkpoint(root: str) -> tuple[int, str] | None:
    """(iteration, directory) of the checkpoint the tracker names, or None when there is none."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as f:
        entry = json.load(f)
    path = os.path.join(root, entry["dir"])
    if not is_checkpoint_dir(path):
        raise FileNotFoundError(f"{tracker} names {entry['dir']!r}, which is not a complete "
                                f"checkpoint; the directory was changed by hand")
    return int(entry["iteration"]), path


def find_checkpoint(load: str, step: int | None = None) -> tuple[int, str] | None:
    """The checkpoint to resume from: --load may be a --save directory (latest, or iteration
    `step`) or one checkpoint directory itself. None when --load holds no checkpoint yet."""
    if is_checkpoint_dir(load):
        state = read_train_state(load)
        if step is not None and state["iteration"] != step:
            raise FileNotFoundError(f"--load {load!r} is the checkpoint of iteration "
                                    f"{state['iteration']}, not --ckpt-step {step}")
        return state["iteration"], load
    if step is None:
        return find_latest_checkpoint(load) if os.path.isdir(load) else None
    found = dict(committed_checkpoints(load)).get(step)
    if found is None:
        raise FileNotFoundError(f"--load {load!r} has no complete checkpoint of iteration {step} "
                                "(--ckpt-step)")
    return step, found


def committed_checkpoints(root: str) -> list[tuple[int, str]]:
    """(iteration, directory) of every committed checkpoint under a --save directory, oldest
    first; of several versions of one iteration, the newest."""
    newest: dict[int, tuple[int, str]] = {}
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = _NAME.match(name)
        if m and is_checkpoint_dir(os.path.join(root, name)):
            version = (int(m.group(2) or 1), name)
            newest[int(m.group(1))] = max(newest.get(int(m.group(1)), version), version)
    return [(it, os.path.join(root, name)) for it, (_, name) in sorted(newest.items())]


def read_train_state(path: str) -> dict:
    with open(os.path.join(path, TRAIN_STATE), encoding="utf-8") as f:
        return json.load(f)
