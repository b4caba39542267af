"""The checkpoint manifest: what it records (against hashlib and os.stat directly), what
verification finds, and the write-failure message."""

import hashlib
import json
import os

import pytest
from test_checkpoint_dirs import write_checkpoint_files

from megatron_averis.training import checkpoint_dirs as cd
from megatron_averis.training import checkpoint_integrity as ci


def sealed_checkpoint(root, iteration=10, checksum="sha256", world=3):
    """A committed checkpoint whose manifest was built by `world` ranks, each hashing its share."""
    tmp = cd.prepare_temp_dir(str(root), iteration)
    write_checkpoint_files(tmp, payload="x" * 1000)
    os.makedirs(os.path.join(tmp, "sub"))
    with open(os.path.join(tmp, "sub", "part.bin"), "wb") as f:
        f.write(bytes(range(256)) * 9)
    files = ci.list_files(tmp)
    entries = {}
    for rank in range(world):
        entries.update(ci.describe_files(tmp, ci.share(files, rank, world), checksum))
    ci.write_manifest(tmp, entries, checksum)
    return cd.commit(str(root), iteration)


def test_manifest_records_every_file_common_state_included(tmp_path):
    path = sealed_checkpoint(tmp_path)
    with open(os.path.join(path, ci.MANIFEST)) as f:
        manifest = json.load(f)
    expected = {}
    for rel in ("__0_0.distcp", "common.pt", "metadata.json", os.path.join("sub", "part.bin")):
        with open(os.path.join(path, rel), "rb") as f:
            data = f.read()
        expected[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest == {"format": 1, "checksum": "sha256", "files": expected}
    assert ci.check(path) == []
    # Any split over ranks covers every file once.
    assert sorted(f for r in range(4) for f in ci.share(sorted(expected), r, 4)) == sorted(expected)


def test_truncation_corruption_and_missing_files_are_named(tmp_path):
    path = sealed_checkpoint(tmp_path)
    shard = os.path.join(path, "__0_0.distcp")
    os.truncate(shard, 598)
    assert ci.check(path) == [f"{shard} has 598 bytes, the manifest records 1,000 (truncated or "
                              "overwritten)"]
    with open(shard, "w") as f:
        f.write("y" * 1000)  # same size, other bytes
    assert ci.check(path) == [f"{shard} does not match its SHA-256 in the manifest (corrupted)"]
    os.remove(shard)
    part = os.path.join(path, "sub", "part.bin")
    os.truncate(part, 0)
    # Two ranks each find their share's problem.
    found = ci.check(path, 0, 2) + ci.check(path, 1, 2)
    assert sorted(found) == sorted([f"{shard} is missing",
                                    f"{part} has 0 bytes, the manifest records 2,304 (truncated or "
                                    "overwritten)"])


def test_common_state_and_manifest_damage(tmp_path):
    path = sealed_checkpoint(tmp_path)
    common = os.path.join(path, "common.pt")  # the iteration, train state and schedule
    with open(common, "w") as f:
        f.write("d")  # one byte changed, same size
    assert ci.check(path) == [f"{common} does not match its SHA-256 in the manifest (corrupted)"]
    manifest = os.path.join(path, ci.MANIFEST)
    with open(manifest, "w") as f:
        f.write("{")
    assert ci.check(path)[0].startswith(f"{manifest} cannot be read (JSONDecodeError")
    assert ci.check(path, rank=1, world=2) == []  # reported once, by rank 0
    os.remove(manifest)
    assert ci.check(path) is None  # an older checkpoint: nothing to verify against


def test_size_only_manifest(tmp_path):
    path = sealed_checkpoint(tmp_path, checksum="size")
    with open(os.path.join(path, ci.MANIFEST)) as f:
        assert all(set(e) == {"bytes"} for e in json.load(f)["files"].values())
    with open(os.path.join(path, "__0_0.distcp"), "w") as f:
        f.write("y" * 1000)
    assert ci.check(path) == []  # sizes only: a same-size change passes
    os.truncate(os.path.join(path, "__0_0.distcp"), 10)
    assert len(ci.check(path)) == 1


def test_write_failure_message(tmp_path, monkeypatch):
    class FromWorker(BaseException):  # what megatron-core raises: a traceback as text, no errno
        pass

    error = FromWorker("CheckpointException ranks:dict_keys([0])\nTraceback (most recent call last)"
                       "\n  ...\nRuntimeError: Worker failure: [Errno 28] No space left on device")
    usage = type("usage", (), {"free": 12_345})
    monkeypatch.setattr(ci.shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(ci.resource, "getrlimit", lambda kind: (ci.resource.RLIM_INFINITY,) * 2)
    temp = str(tmp_path / "iter_0000004.tmp")
    msg = ci.write_failure_message(error, temp, str(tmp_path), 2_493_004, (2, "ck/iter_0000002"))
    assert msg == (f"writing the checkpoint into {temp} failed ([Errno 28] No space left on "
                   "device). A checkpoint of this model needs about 2,493,004 bytes and the file "
                   f"system of {tmp_path} has 12,345 bytes free. Free space (or give another --save) "
                   "and resume; the partial iter_0000004.tmp was removed, and the latest checkpoint "
                   "is still iteration 2 (ck/iter_0000002).")
    assert ci.write_failure_message(ValueError("boom"), temp, str(tmp_path), 1, None).endswith(
        "no earlier checkpoint exists.")


@pytest.mark.parametrize("text,summary", [
    ("CheckpointException ranks:dict_keys([0])\nTraceback:\n  File x\nAssertionError: metadata is "
     "None; global metadata read failed: pickle data was truncated",
     "AssertionError: metadata is None; global metadata read failed: pickle data was truncated"),
    ("plain failure", "RuntimeError: plain failure"),
    ("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598",
     "a write came up short, unexpected pos 704 vs 598: the disk is full or a limit was hit"),
])
def test_error_summary(text, summary):
    assert ci.error_summary(RuntimeError(text)) == summary
