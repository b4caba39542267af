"""Reading training text from jsonl or plain-text files.

Input is split into *records* (raw bytes plus the file and line they start
on) by the reading process, and records are turned into text by
``parse_record``, which may run in a worker process. Every problem is raised as
a ``DataInputError`` that names the file, the line and the fix.
"""

import glob
import gzip
import json
import os
from typing import Iterator, List, Optional, Sequence, Tuple

INPUT_FORMATS = ("auto", "jsonl", "text")
# How a plain-text file is cut into documents.
TEXT_MODES = ("file", "paragraph", "line")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class DataInputError(Exception):
    """Bad input: ``str()`` gives ``path:line: problem (fix)``."""

    def __init__(self, path: str, line: Optional[int], problem: str, fix: Optional[str] = None):
        self.path, self.line, self.problem, self.fix = path, line, problem, fix
        super().__init__(path, line, problem, fix)

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.problem}" + (f"; {self.fix}" if self.fix else "")


def detect_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.lower().endswith(_JSONL_SUFFIXES) else "text"


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Expand globs (sorted, so the document order is reproducible) and check
    that every path is a readable, non-empty regular file."""
    paths: List[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataInputError(pattern, None, "the pattern matches no file",
                                     "check the path and quote the glob")
            paths.extend(m for m in matches if not os.path.isdir(m))
        else:
            paths.append(pattern)
    if not paths:
        raise DataInputError(", ".join(patterns) or "(none)", None, "no input files given")
    for path in paths:
        check_readable(path)
    return paths


def check_readable(path: str) -> None:
    if os.path.isdir(path):
        raise DataInputError(path, None, "is a directory, not a file",
                             f"pass the files in it, e.g. '{os.path.join(path, '*.jsonl')}'")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as e:
        raise DataInputError(path, None, f"cannot read the file: {e.strerror or e}",
                             "check that it exists and that you may read it") from None
    if not head:
        raise DataInputError(path, None, "the file is empty (0 bytes)",
                             "remove it from the inputs or give it content")


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_records(path: str, fmt: str = "auto", text_mode: str = "file"
                 ) -> Iterator[Tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` for each document of one file."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in ("jsonl", "text"):
        raise ValueError(f"unknown input format {fmt!r}; use one of {INPUT_FORMATS}")
    if text_mode not in TEXT_MODES:
        raise ValueError(f"unknown text mode {text_mode!r}; use one of {TEXT_MODES}")
    count = 0
    try:
        with _open_binary(path) as f:
            if fmt == "jsonl" or text_mode == "line":
                for lineno, raw in enumerate(f, start=1):
                    if raw.strip():
                        count += 1
                        yield lineno, raw
            elif text_mode == "file":
                data = f.read()
                if data.strip():
                    count += 1
                    yield 1, data
            else:  # paragraph: blocks separated by blank lines
                block, start = [], 0
                for lineno, raw in enumerate(f, start=1):
                    if raw.strip():
                        if not block:
                            start = lineno
                        block.append(raw)
                    elif block:
                        count += 1
                        yield start, b"".join(block)
                        block = []
                if block:
                    count += 1
                    yield start, b"".join(block)
    except (OSError, EOFError) as e:
        # Covers truncated or corrupt .gz files as well as I/O errors.
        raise DataInputError(path, None, f"cannot read the file: {e}",
                             "check the file (a .gz must be a complete gzip stream)") from None
    if count == 0:
        raise DataInputError(path, None, "the file holds no documents (only blank lines)",
                             "remove it from the inputs or give it content")


def parse_record(path: str, line: int, raw: bytes, fmt: str, text_field: str = "text") -> str:
    """Turn one record's bytes into document text, or raise DataInputError."""
    if fmt == "auto":
        fmt = detect_format(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = line + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataInputError(
            path, bad_line, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})",
            "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    if fmt == "text":
        return text
    try:
        obj = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        # json's messages end in "at" before the position it reports apart.
        reason = e.msg[:-3] if e.msg.endswith(" at") else e.msg
        raise DataInputError(path, line, f"invalid JSON: {reason} (column {e.colno})",
                             "each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise DataInputError(path, line, f"expected a JSON object, got {type(obj).__name__}",
                             "each line must be one JSON object")
    if text_field not in obj:
        present = ", ".join(sorted(obj)[:10]) or "none"
        raise DataInputError(path, line, f"no field {text_field!r} (fields: {present})",
                             "name the text field with --json-key")
    value = obj[text_field]
    if not isinstance(value, str):
        raise DataInputError(path, line,
                             f"field {text_field!r} is {type(value).__name__}, not a string",
                             "store the document text as a JSON string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataInputError(path, line,
                             f"field {text_field!r} holds an unpaired surrogate "
                             f"\\u{ord(value[e.start]):04x}",
                             "escape only valid code points in the JSON") from None
    return value


def iter_documents(paths: Sequence[str], fmt: str = "auto", text_field: str = "text",
                   text_mode: str = "file") -> Iterator[str]:
    """Document texts of all files, in order (checked as ``parse_record`` does)."""
    for path in paths:
        file_fmt = detect_format(path) if fmt == "auto" else fmt
        for line, raw in iter_records(path, file_fmt, text_mode):
            yield parse_record(path, line, raw, file_fmt, text_field)
