"""Checkpoint directory layout (Megatron-LM's) and its atomic commit.

    <save>/latest_checkpointed_iteration.txt   "N"  (Megatron-LM's tracker; replaced last)
    <save>/iter_000000N/                       a complete megatron-core dist checkpoint, with
                                               the manifest of its files (checkpoint_integrity.py)
    <save>/iter_000000N.tmp/                   a checkpoint being written (never tracked)

A checkpoint is written into `<name>.tmp`, renamed to its final name once every rank has finished,
and only then named in the tracker, which is replaced atomically (temporary file + os.replace).
A crash at any point leaves the tracker naming the previous complete checkpoint. A second
checkpoint of an iteration that already has one (a re-run from an older checkpoint) replaces it
in two renames: the old one becomes `iter_N.superseded` first and is deleted only after the new
one is in place, and a lookup falls back to it if a crash came in between.

Both Megatron-LM's and this trainer's checkpoints have this layout; which one a directory holds
is told by its common state (checkpointing.py). No torch.distributed here: the caller provides
the barriers.
"""

from __future__ import annotations

import os
import re
import shutil

TRACKER = "latest_checkpointed_iteration.txt"
OLD_TRACKER = "latest_checkpoint.json"  # megatron-averis before the Megatron-LM layout
_TMP_SUFFIX = ".tmp"
_SUPERSEDED = ".superseded"
_NAME = re.compile(r"^iter_(\d{7,})$")
_DIR_NAME = re.compile(r"^iter_(\d{7,})(?:\.superseded)?$")  # a complete one, or one replaced
# What marks a directory as holding checkpoints (of any layout), so that --load refuses it
# rather than starting afresh when it has no tracker.
_CHECKPOINT_MARKS = re.compile(r"^(iter_\d+(\.superseded)?|release|latest_checkpoint\.json|"
                               r"metadata\.json|common\.pt|.*\.distcp|model_optim_rng\.pt|"
                               r"mp_rank_\d+.*)$")
_LEGACY_MARKS = re.compile(r"^(model_optim_rng\.pt|mp_rank_\d+.*)$")  # --ckpt-format torch


class UnrecognisedCheckpoint(ValueError):
    """--load names something that holds checkpoint files but no checkpoint this program reads."""


class TrackerDamaged(ValueError):
    """The tracker cannot be read, or names an iteration without a complete checkpoint: damage
    (a crash or a hand edit), which loading answers with the newest intact checkpoint."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def temp_dir(root: str, iteration: int) -> str:
    return os.path.join(root, iteration_dir_name(iteration) + _TMP_SUFFIX)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + _TMP_SUFFIX
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
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


def commit(root: str, iteration: int) -> str:
    """(rank 0, after every rank finished writing into the temp dir) Make it the latest
    checkpoint; returns the final directory."""
    tmp = temp_dir(root, iteration)
    _fsync_dir(tmp)
    final = os.path.join(root, iteration_dir_name(iteration))
    old = final + _SUPERSEDED
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_checkpoint_dir(path: str) -> bool:
    """A complete megatron-core dist checkpoint (its metadata and common state are written last
    by each rank's save; the commit above makes the directory appear only when all are done)."""
    return (os.path.isfile(os.path.join(path, "metadata.json"))
            and os.path.isfile(os.path.join(path, "common.pt")))


def _iteration_dir(root: str, iteration: int) -> str | None:
    """The complete checkpoint of `iteration` in root (or the one it was replacing, when a crash
    came between the two renames of commit), else None."""
    final = os.path.join(root, iteration_dir_name(iteration))
    for path in (final, final + _SUPERSEDED):
        if is_checkpoint_dir(path):
            return path
    return None


def read_tracker(root: str) -> int | str | None:
    """The tracker's iteration ('release' for Megatron-LM's release checkpoints), None without."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    try:
        with open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise TrackerDamaged(f"{tracker} cannot be read ({type(e).__name__}: {e})") from None
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise TrackerDamaged(f"{tracker} holds {text[:40]!r}, not an iteration number") from None


def find_latest_checkpoint(root: str) -> tuple[int, str] | None:
    """(iteration, directory) of the checkpoint the tracker names, or None when there is none."""
    entry = read_tracker(root)
    if entry is None:
        return None
    if entry == "release":
        path = os.path.join(root, "release")
        if not is_checkpoint_dir(path):
            raise FileNotFoundError(f"{root}/{TRACKER} names 'release', which is not a complete "
                                    "dist checkpoint")
        return 0, path
    path = _iteration_dir(root, entry)
    if path is not None:
        return entry, path
    named = os.path.join(root, iteration_dir_name(entry))
    problem = (f"{os.path.join(root, TRACKER)} names iteration {entry}, but "
               f"{iteration_dir_name(entry)} is not a complete checkpoint")
    if os.path.isdir(named) and any(_LEGACY_MARKS.match(n) for n in os.listdir(named)):
        raise UnrecognisedCheckpoint(f"{problem}: it is in Megatron-LM's --ckpt-format torch; "
                                     "convert it with Megatron-LM's --ckpt-convert-format torch_dist")
    raise TrackerDamaged(problem)


def find_checkpoint(load: str, step: int | None = None) -> tuple[int | None, str] | None:
    """The checkpoint to resume from: --load may be a --save directory (latest, or iteration
    `step`) or one checkpoint directory itself (iteration None: read from its common state).
    None when --load holds no checkpoint yet (missing, or without checkpoint files: a fresh
    start); UnrecognisedCheckpoint when it holds checkpoint files of another layout;
    TrackerDamaged when its tracker is."""
    if is_checkpoint_dir(load):
        return None, load
    if not os.path.isdir(load):
        return None
    if step is not None:
        path = _iteration_dir(load, step)
        if path is None:
            raise FileNotFoundError(f"--load {load!r} has no complete checkpoint of iteration "
                                    f"{step} (--ckpt-step)")
        return step, path
    found = find_latest_checkpoint(load)
    if found is not None:
        return found
    if os.path.isfile(os.path.join(load, OLD_TRACKER)):
        raise UnrecognisedCheckpoint(
            f"--load {load!r} is in the layout of megatron-averis before it adopted Megatron-LM's "
            f"({OLD_TRACKER}); point --load at one of its iter_* directories to read its weights")
    marks = sorted(n for n in os.listdir(load) if _CHECKPOINT_MARKS.match(n))
    if marks:
        raise UnrecognisedCheckpoint(
            f"--load {load!r} holds checkpoint files ({', '.join(marks[:4])}) but no "
            f"{TRACKER}; give a directory written with --ckpt-format torch_dist by Megatron-LM or "
            "this program, or one of its iter_* directories")
    return None


def iteration_of(path: str) -> int | None:
    """The iteration an `iter_N` (or `iter_N.superseded`) directory holds, by its name."""
    m = _DIR_NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def committed_checkpoints(root: str) -> list[tuple[int, str]]:
    """(iteration, directory) of every complete checkpoint under a --save directory, oldest
    first, found as a lookup of that iteration finds it."""
    names = os.listdir(root) if os.path.isdir(root) else []
    found = ((it, _iteration_dir(root, it))
             for it in sorted({iteration_of(n) for n in names} - {None}))
    return [(it, path) for it, path in found if path is not None]
