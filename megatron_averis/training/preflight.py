"""Start-up checks of everything a run will touch, before the first step: the datasets' files,
the checkpoint to resume from, and room to write checkpoints and logs.

Each check returns problems, one line each naming the flag or file and the fix; the caller
(arguments.finalize_args, loop.main) reports them all at once as a ConfigError. Nothing here
needs torch.distributed: every rank runs the same checks on the same files.
"""

from __future__ import annotations

import errno
import os
import tempfile

import numpy

from megatron_averis.training import checkpoint_dirs
from megatron_averis.training.checkpoint_integrity import free_bytes, nearest_existing
from megatron_averis.training.presets import ModelArch, padded_vocab_size, parameter_counts

# megatron-core's indexed dataset (.idx): magic, version (u64) = 1, dtype code (u8), sequence
# count S (u64), document count D (u64); then int32 lengths[S], int64 byte offsets into .bin[S],
# int64 document boundaries[D] (0, ..., S); multimodal datasets add int8 modes[S].
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
_TOKEN_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core DType codes
_CHUNK = 1 << 24  # sequences checked at a time (bounded memory on large corpora)
_REBUILD = "rebuild it with tools/preprocess_data.py"


def indexed_dataset_problems(flag: str, prefix: str) -> list[str]:
    """The .idx of `prefix` must be a complete megatron-core index whose sequences exactly tile
    its .bin: a truncated .bin otherwise passes every check until a batch reads its tail."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    size, bin_size = os.path.getsize(idx), os.path.getsize(bin_path)
    where = f"{flag}: {idx}"
    if size < _IDX_HEADER_BYTES:
        return [f"{where} has {size} bytes, less than the {_IDX_HEADER_BYTES}-byte header "
                f"(empty or truncated); {_REBUILD}"]
    data = numpy.memmap(idx, dtype=numpy.uint8, mode="r")
    header = bytes(data[:_IDX_HEADER_BYTES])
    version = int.from_bytes(header[9:17], "little")
    code = header[17]
    seqs, docs = (int.from_bytes(header[18:26], "little"), int.from_bytes(header[26:34], "little"))
    if header[:9] != _IDX_MAGIC or version != 1 or code not in _TOKEN_BYTES:
        return [f"{where} is not a megatron-core index (header {header[:9]!r}, version {version}, "
                f"dtype code {code}); {_REBUILD}"]
    expected = _IDX_HEADER_BYTES + 12 * seqs + 8 * docs
    if size not in (expected, expected + seqs):  # + seqs: multimodal modes
        return [f"{where} has {size:,} bytes but its header ({seqs:,} sequences, {docs:,} document "
                f"boundaries) needs {expected:,} (truncated or overwritten); {_REBUILD}"]
    if seqs == 0:
        return [f"{where} holds no sequences; {_REBUILD} from non-empty input"]
    lengths = numpy.frombuffer(data, numpy.int32, seqs, _IDX_HEADER_BYTES)
    pointers = numpy.frombuffer(data, numpy.int64, seqs, _IDX_HEADER_BYTES + 4 * seqs)
    bounds = numpy.frombuffer(data, numpy.int64, docs, _IDX_HEADER_BYTES + 12 * seqs)
    width = _TOKEN_BYTES[code]
    offset = 0
    for lo in range(0, seqs, _CHUNK):
        n = lengths[lo:lo + _CHUNK].astype(numpy.int64)
        start = offset + numpy.concatenate(([0], numpy.cumsum(n[:-1] * width)))
        if (n < 0).any() or not numpy.array_equal(start, pointers[lo:lo + _CHUNK]):
            return [f"{where}: its sequence lengths and offsets disagree (corrupted); {_REBUILD}"]
        offset = int(start[-1] + n[-1] * width)
    if offset != bin_size:
        return [f"{flag}: {bin_path} has {bin_size:,} bytes but {idx} describes {offset:,} "
                f"({'truncated' if bin_size < offset else 'the files do not belong together'}); "
                f"{_REBUILD}"]
    if docs < 2 or bounds[0] != 0 or bounds[-1] != seqs or (numpy.diff(bounds) < 0).any():
        return [f"{where}: its document boundaries do not cover its {seqs:,} sequences "
                f"(corrupted); {_REBUILD}"]
    return []


def _same_dir(a: str, b: str | None) -> bool:
    return b is not None and os.path.realpath(a) == os.path.realpath(b)


def load_problems(args) -> list[str]:
    """--load must hold what it promises: checkpoints in a layout this program reads, the
    --ckpt-step asked for, and some checkpoint unless it is the --save directory (resume-or-start)
    or --allow-fresh-start says a fresh start is meant. A damaged tracker or checkpoint is
    reported when it is loaded, with the newest intact checkpoint (--ckpt-fallback loads it)."""
    if not args.load:
        return []
    try:
        found = checkpoint_dirs.find_checkpoint(args.load, args.ckpt_step)
    except checkpoint_dirs.TrackerDamaged:
        return []
    except checkpoint_dirs.UnrecognisedCheckpoint as e:
        return [str(e)]
    except FileNotFoundError as e:
        have = [it for it, _ in checkpoint_dirs.committed_checkpoints(args.load)]
        return [f"{e}; complete checkpoints there: "
                + (", ".join(map(str, have)) if have else "none")]
    if found is not None or args.allow_fresh_start or _same_dir(args.load, args.save):
        return []
    what = "does not exist" if not os.path.exists(args.load) else "holds no checkpoint"
    return [f"--load {args.load!r} {what}, so the run would start from scratch; correct the path, "
            "give --load the --save directory to resume from it when it has a checkpoint, or add "
            "--allow-fresh-start to start from scratch"]


def checkpoint_bytes(arch: ModelArch, padded_vocab: int, bf16: bool) -> int:
    """About the size of one checkpoint: the weights (BF16 or FP32), with --bf16 their FP32 main
    copies, Adam's two FP32 moments, and 10% for metadata and the rest of the state (measured on
    the tiny model: 7% over the tensors)."""
    per_parameter = (2 + 4 if bf16 else 4) + 8
    return int(parameter_counts(arch, padded_vocab)["total"] * per_parameter * 1.1)


def _write_problem(flag: str, directory: str, write: bool) -> str | None:
    """Create `directory` if needed and write and remove a file in it, as the run will; without
    `write` (--dry-run writes nothing) ask the OS whether that would be allowed."""
    try:
        if write:
            os.makedirs(directory, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
            try:
                os.write(fd, b"\0")
            finally:
                os.close(fd)
                os.remove(probe)
        else:
            existing = nearest_existing(directory)
            if not os.path.isdir(existing):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        return (f"{flag} {directory!r} is not writable ({type(e).__name__}: {e.strerror or e}); "
                "choose a directory you can write to, or fix its permissions")
    return None


def output_problems(args, vocab_size: int) -> list[str]:
    """--save and the log directory must be writable, and --save's file system must have room for
    one more checkpoint: otherwise the run trains and then loses everything at its first save."""
    dirs = {"--save": args.save} if args.save else {}
    if not args.save or not _same_dir(args.log_dir, args.save):
        dirs["--log-dir"] = args.log_dir
    problems = [p for flag, d in dirs.items() if (p := _write_problem(flag, d, not args.dry_run))]
    if args.save and not problems:
        padded = padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by,
                                   args.tensor_model_parallel_size)
        need, free = checkpoint_bytes(args.arch, padded, args.bf16), free_bytes(args.save)
        if free < need:
            problems.append(f"--save {args.save!r}: its file system has {free:,} bytes free but one "
                            f"checkpoint of this model needs about {need:,}; free space or choose "
                            "another --save")
    return problems
