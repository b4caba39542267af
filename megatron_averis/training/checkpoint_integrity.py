"""Checkpoint integrity: a manifest of every file's size (and SHA-256) written into each checkpoint
before it is committed, verified before it is loaded.

    <checkpoint>/checkpoint_manifest.json
        {"format": 1, "checksum": "sha256" | "size",
         "files": {"__0_0.distcp": {"bytes": 1212621, "sha256": "..."}, "common.pt": {...}, ...}}

The manifest covers every file of the checkpoint, the common state (common.pt: iteration, train
state, schedule, args) included, and is written last, before the commit. Every function takes the
checkpoint directory itself, so nothing here depends on how checkpoints are named or tracked
(checkpoint_dirs.py). Hashing is split over the ranks (`share`): each hashes every world-th file
and the caller gathers the parts, so a large checkpoint is hashed in parallel.
No torch.distributed here: the caller gathers the parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil

MANIFEST = "checkpoint_manifest.json"
CHECKSUMS = ("sha256", "size")
_FORMAT = 1
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message names the file and the way out."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint's files do not match its manifest, or cannot be read at all."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"checkpoint {path} is damaged: {problem}")


class CheckpointWriteFailed(CheckpointError):
    """A checkpoint could not be written; the partial directory is gone, the previous is latest."""


def list_files(directory: str) -> list[str]:
    """Paths relative to `directory` of every file the manifest covers, sorted."""
    out = []
    for base, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_files(directory: str, files: list[str], checksum: str) -> dict[str, dict]:
    """{relative path: {"bytes": size[, "sha256": digest]}} of `files`."""
    out = {}
    for rel in files:
        path = os.path.join(directory, rel)
        entry = {"bytes": os.path.getsize(path)}
        if checksum == "sha256":
            entry["sha256"] = _sha256(path)
        out[rel] = entry
    return out


def share(files: list[str], rank: int, world: int) -> list[str]:
    """The files rank `rank` of `world` hashes."""
    return files[rank::world]


def write_manifest(directory: str, files: dict[str, dict], checksum: str) -> None:
    """(one rank, after every file is written) The manifest, flushed to disk."""
    path = os.path.join(directory, MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"format": _FORMAT, "checksum": checksum, "files": files}, f, indent=1,
                  sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_manifest(directory: str) -> dict | None:
    """The manifest, or None for a checkpoint written without one (older versions, other tools).
    Raises CheckpointDamaged when it is there but unreadable."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != _FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointDamaged(directory, f"{path} cannot be read ({type(e).__name__}: {e})") from None
    return manifest


def file_problems(directory: str, manifest: dict, files: list[str]) -> list[str]:
    """What is wrong with `files` (a share of the manifest's) in `directory`, one line per file."""
    problems = []
    for rel in files:
        want = manifest["files"][rel]
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
            continue
        size = os.path.getsize(path)
        if size != want["bytes"]:
            problems.append(f"{path} has {size:,} bytes, the manifest records {want['bytes']:,} "
                            "(truncated or overwritten)")
        elif "sha256" in want and _sha256(path) != want["sha256"]:
            problems.append(f"{path} does not match its SHA-256 in the manifest (corrupted)")
    return problems


def check(directory: str, rank: int = 0, world: int = 1) -> list[str] | None:
    """What is wrong with rank `rank`'s share of the checkpoint in `directory` ([] when intact;
    rank 0 also reports an unreadable manifest); None when it has no manifest."""
    try:
        manifest = read_manifest(directory)
    except CheckpointDamaged as e:
        return [e.problem] if rank == 0 else []
    if manifest is None:
        return None
    return file_problems(directory, manifest, share(sorted(manifest["files"]), rank, world))


def _os_error(error: BaseException) -> str | None:
    """The '[Errno N] text' behind a failed write: megatron-core's writer processes report it only
    inside the text of the exception they pass back."""
    seen = error
    while seen is not None:
        m = re.search(r"\[Errno \d+\][^\n]*", str(seen))
        if m:
            return m.group(0).strip()
        seen = seen.__cause__ or seen.__context__
    return None


def error_summary(error: BaseException) -> str:
    """One line for an exception from megatron-core's reader or writer, whose message is often a
    whole traceback of another rank or process: its OS error, else its last 'XError: ...' line."""
    os_error = _os_error(error)
    if os_error:
        return os_error
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
    summary = named[-1] if named else f"{type(error).__name__}: {lines[0] if lines else ''}"
    short = re.search(r"unexpected pos \d+ vs \d+", str(error))
    if short:  # torch.save's writer saw fewer bytes written than it wrote; the errno is lost
        return f"a write came up short, {short.group(0)}: the disk is full or a limit was hit"
    return summary


def nearest_existing(path: str) -> str:
    """`path`, or its nearest ancestor that exists (where creating it would start)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int:
    """Free bytes of the file system that holds `path` (or would, once it is created)."""
    return shutil.disk_usage(nearest_existing(path)).free


def write_failure_message(error: BaseException, temp: str, root: str, bytes_needed: int,
                          latest: tuple[int, str] | None) -> str:
    """One paragraph for a checkpoint that could not be written: why, the space it needs and has,
    and what is left (the caller has removed `temp`)."""
    parts = [f"writing the checkpoint into {temp} failed ({error_summary(error)}).",
             f"A checkpoint of this model needs about {bytes_needed:,} bytes and the file system of "
             f"{root} has {free_bytes(root):,} bytes free."]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        parts.append(f"This process may write files of at most {limit:,} bytes (ulimit -f).")
    parts.append(f"Free space (or give another --save) and resume; the partial {os.path.basename(temp)} "
                 "was removed, and "
                 + (f"the latest checkpoint is still iteration {latest[0]} ({latest[1]})." if latest
                    else "no earlier checkpoint exists."))
    return " ".join(parts)
