"""Bad input: a message naming file and line, and no output left behind."""

import gzip
import json
import os

import pytest

from megatron_averis.data.cli import main_preprocess
from megatron_averis.data.indexed import preprocess_files
from megatron_averis.data.sources import DataInputError

GOOD = json.dumps({"text": "a good document"}) + "\n"


def run(inputs, prefix, model, **kw):
    return preprocess_files(inputs, prefix, model, show_progress=False, **kw)


def assert_fails(tmp_path, model, inputs, expected_start, contains=(), **kw):
    out_dir = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataInputError) as e:
        run(inputs, str(out_dir / "ds"), model, **kw)
    msg = str(e.value)
    assert msg.startswith(expected_start), msg
    for c in contains:
        assert c in msg, msg
    # Nothing left behind: no output, no temporary files, not even the folder.
    assert not out_dir.exists()
    assert sorted(os.listdir(tmp_path)) == before
    return msg


def write_bytes(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_missing_field(tmp_path, sp_model):
    p = write_bytes(tmp_path, "a.jsonl", (GOOD * 2 + '{"body": "x", "id": 3}\n').encode())
    assert_fails(tmp_path, sp_model, [p], f"{p}:3: no field 'text'",
                 ["fields: body, id", "--json-key"])


def test_wrong_json_key_everywhere(tmp_path, sp_model):
    p = write_bytes(tmp_path, "a.jsonl", GOOD.encode())
    assert_fails(tmp_path, sp_model, [p], f"{p}:1: no field 'content'", text_field="content")


def test_invalid_utf8_in_jsonl(tmp_path, sp_model):
    p = write_bytes(tmp_path, "a.jsonl", GOOD.encode() + b'{"text": "caf\xe9"}\n' + GOOD.encode())
    assert_fails(tmp_path, sp_model, [p], f"{p}:2: invalid UTF-8 (byte 0xe9 at column 14)",
                 ["iconv"])


def test_invalid_utf8_in_text_reports_the_line(tmp_path, sp_model):
    p = write_bytes(tmp_path, "a.txt", b"line one\nline two\nline three\nbad \xff here\n")
    assert_fails(tmp_path, sp_model, [p], f"{p}:4: invalid UTF-8 (byte 0xff at column 5)")
    assert_fails(tmp_path, sp_model, [p], f"{p}:4: invalid UTF-8", text_mode="paragraph")


def test_invalid_json_and_non_objects(tmp_path, sp_model):
    p = write_bytes(tmp_path, "a.jsonl", (GOOD + '{"text": "unterminated}\n').encode())
    assert_fails(tmp_path, sp_model, [p], f"{p}:2: invalid JSON")
    q = write_bytes(tmp_path, "b.jsonl", (GOOD + '["a list"]\n').encode())
    assert_fails(tmp_path, sp_model, [q], f"{q}:2: expected a JSON object, got list")
    r = write_bytes(tmp_path, "c.jsonl", (GOOD + '{"text": 42}\n').encode())
    assert_fails(tmp_path, sp_model, [r], f"{r}:2: field 'text' is int, not a string")
    s = write_bytes(tmp_path, "d.jsonl", (GOOD + '{"text": "\\ud800"}\n').encode())
    assert_fails(tmp_path, sp_model, [s], f"{s}:2: field 'text' holds an unpaired surrogate")


def test_empty_and_blank_files(tmp_path, sp_model):
    good = write_bytes(tmp_path, "good.jsonl", GOOD.encode())
    empty = write_bytes(tmp_path, "empty.jsonl", b"")
    assert_fails(tmp_path, sp_model, [good, empty], f"{empty}: the file is empty (0 bytes)")
    blank = write_bytes(tmp_path, "blank.txt", b"\n  \n\n")
    assert_fails(tmp_path, sp_model, [blank], f"{blank}: the file holds no documents")


def test_unreadable_paths(tmp_path, sp_model):
    missing = str(tmp_path / "nope.jsonl")
    assert_fails(tmp_path, sp_model, [missing], f"{missing}: cannot read the file",
                 ["No such file"])
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_fails(tmp_path, sp_model, [str(folder)], f"{folder}: is a directory",
                 [os.path.join(str(folder), "*.jsonl")])
    pattern = str(tmp_path / "*.nothing")
    assert_fails(tmp_path, sp_model, [pattern], f"{pattern}: the pattern matches no file")


def test_corrupt_gzip(tmp_path, sp_model):
    data = gzip.compress((GOOD * 100).encode())
    p = write_bytes(tmp_path, "cut.jsonl.gz", data[: len(data) // 2])
    assert_fails(tmp_path, sp_model, [p], f"{p}: cannot read the file")


def test_only_empty_documents(tmp_path, sp_model):
    p = write_bytes(tmp_path, "e.jsonl", b'{"text": ""}\n{"text": ""}\n')
    assert_fails(tmp_path, sp_model, [p], str(tmp_path / "out" / "ds"),
                 ["no document has any text"])


def test_error_in_a_worker_keeps_the_previous_output(tmp_path, sp_model):
    """A late bad line, found by a worker process: the earlier good output stays."""
    good = write_bytes(tmp_path, "good.jsonl", (GOOD * 50).encode())
    prefix = str(tmp_path / "keep")
    run([good], prefix, sp_model)
    old = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}
    lines = [json.dumps({"text": f"document {i}"}) for i in range(3000)]
    lines[2500] = json.dumps({"txt": "typo"})
    bad = write_bytes(tmp_path, "bad.jsonl", ("\n".join(lines) + "\n").encode())
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataInputError, match=f"^{bad}:2501: no field 'text'"):
        preprocess_files([bad], prefix, sp_model, workers=2, show_progress=False)
    assert sorted(os.listdir(tmp_path)) == before
    assert {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")} == old


def test_cli_exit_code_and_message(tmp_path, sp_model, capsys):
    p = write_bytes(tmp_path, "a.jsonl", (GOOD + "{}\n").encode())
    rc = main_preprocess(["-i", p, "-o", str(tmp_path / "o"), "--tokenizer-model", sp_model,
                          "-q", "-j", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: {p}:2: no field 'text'") and "Traceback" not in err


def test_bad_tokenizer_is_reported_before_any_work(tmp_path, capsys):
    p = write_bytes(tmp_path, "a.jsonl", GOOD.encode())
    rc = main_preprocess(["-i", p, "-o", str(tmp_path / "o"), "--tokenizer-model",
                          str(tmp_path / "missing.model"), "-q"])
    assert rc == 2 and "no such sentencepiece model" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]
