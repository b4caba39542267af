"""Tokenizing documents into a megatron-core indexed dataset (.bin/.idx).

One document per sequence, EOD appended (optionally BOS prepended), written
through megatron-core's ``IndexedDatasetBuilder`` with the dtype Megatron-LM
picks for the vocabulary (uint16 below 65500 ids), so Megatron-LM and our
trainer read the output alike.

Work is split into batches of records encoded by a process pool; results
come back in submission order (a bounded window of batches in flight), so the
output does not depend on the number of workers. Output is written under
temporary names and renamed at the end; on any error nothing is left behind.
"""

import collections
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy

from megatron_averis.data.atomic import remove_quietly, temp_path
from megatron_averis.data.backends import TokenizerSpec, file_sha256, open_backend
from megatron_averis.data.progress import Progress
from megatron_averis.data.sources import (DataInputError, detect_format, expand_inputs,
                                          iter_records, parse_record)


# Documents per batch sent to a worker, and the batch's byte cap.
BATCH_DOCS, BATCH_BYTES = 256, 1 << 20


@dataclass(frozen=True)
class Job:
    """One document to encode: raw bytes of a record (parsed in the worker,
    ``fmt`` 'jsonl' or 'text') or ready text (``fmt`` 'str')."""

    path: str
    line: int
    payload: Union[bytes, str]
    fmt: str


@dataclass
class DatasetStats:
    prefix: str
    documents: int
    tokens: int
    text_bytes: int
    empty_documents: int
    dtype: str
    seconds: float
    bin_sha256: str
    idx_sha256: str

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of document text per token (EOD/BOS tokens included)."""
        return self.text_bytes / self.tokens if self.tokens else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bytes_per_token"] = round(self.bytes_per_token, 4)
        d["prefix"] = os.path.basename(self.prefix)
        return d


# --- worker side (no megatron-core import: workers start fast) -------------
_WORKER = {}


def _init_worker(spec: TokenizerSpec, text_field: str, append_eod: bool, prepend_bos: bool,
                 dtype_name: str, threads: int = 1) -> None:
    backend = open_backend(spec)
    backend.threads = threads
    _WORKER.update(backend=backend, text_field=text_field, dtype=numpy.dtype(dtype_name),
                   prefix=[backend.bos_id] if prepend_bos else [],
                   suffix=[backend.eos_id] if append_eod else [])


def _encode_jobs(jobs: Sequence[Job]) -> List[Tuple[Optional[numpy.ndarray], int, int]]:
    """Returns (ids or None for an empty document, text bytes, raw bytes) per job."""
    w = _WORKER
    texts = [j.payload if j.fmt == "str" else
             parse_record(j.path, j.line, j.payload, j.fmt, w["text_field"]) for j in jobs]
    out = []
    for job, text, ids in zip(jobs, texts, w["backend"].encode_batch(texts)):
        nbytes = len(text.encode("utf-8"))
        raw = len(job.payload) if isinstance(job.payload, bytes) else nbytes
        if not ids:
            out.append((None, nbytes, raw))
        else:
            out.append((numpy.asarray(w["prefix"] + ids + w["suffix"], dtype=w["dtype"]),
                        nbytes, raw))
    return out


# --- main side ---------------------------------------------------------------
def _batches(jobs: Iterable[Job], max_docs: int, max_bytes: int) -> Iterator[List[Job]]:
    batch, size = [], 0
    for job in jobs:
        batch.append(job)
        size += len(job.payload)
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered_results(batches: Iterator[List[Job]], workers: int, init_args: tuple):
    """Yield each batch's results in order; at most 4 batches per worker in flight."""
    if workers <= 1:
        _init_worker(*init_args, threads=max(1, os.cpu_count() or 1))
        for b in batches:
            yield _encode_jobs(b)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
    try:
        pending = collections.deque()
        for b in batches:
            pending.append(pool.apply_async(_encode_jobs, (b,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def iter_token_counts(texts: Iterable[str], spec: TokenizerSpec, workers: int = 1,
                      append_eod: bool = True) -> Iterator[int]:
    """Tokens each text would take in a dataset (EOD included; 0 for an empty
    text), in order. Stop early by closing the generator: that stops the pool."""
    init_args = (spec, "text", append_eod, False, "int32")
    jobs = (Job("", 1, text, "str") for text in texts)
    results = _ordered_results(_batches(jobs, BATCH_DOCS, BATCH_BYTES), workers, init_args)
    try:
        for result in results:
            for ids, _, _ in result:
                yield 0 if ids is None else int(ids.size)
    finally:
        results.close()


def write_indexed_dataset(jobs: Iterable[Job], output_prefix: str, spec: TokenizerSpec, *,
                          text_field: str = "text", workers: int = 1, append_eod: bool = True,
                          prepend_bos: bool = False, max_tokens: Optional[int] = None,
                          progress: Optional[Progress] = None, batch_docs: int = BATCH_DOCS,
                          batch_bytes: int = BATCH_BYTES) -> DatasetStats:
    """Encode ``jobs`` into ``output_prefix``.bin/.idx; see the module docstring.

    ``max_tokens`` stops after the document that reaches that many tokens.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    backend = open_backend(spec)  # fail early, in this process, on a bad model
    if prepend_bos and backend.bos_id is None:
        raise ValueError(f"{spec.path}: the tokenizer has no BOS token; drop --prepend-bos")
    dtype = numpy.dtype(DType.optimal_dtype(backend.vocab_size))
    init_args = (spec, text_field, append_eod, prepend_bos, dtype.name)

    prefix = os.path.abspath(output_prefix)
    out_dir = os.path.dirname(prefix)
    made_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    bin_tmp, idx_tmp = temp_path(prefix + ".bin"), temp_path(prefix + ".idx")
    builder = None
    start = time.monotonic()
    if progress:
        progress.restart()
    docs = tokens = text_bytes = empty = 0
    try:
        builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype.type)
        results = _ordered_results(_batches(jobs, batch_docs, batch_bytes), workers, init_args)
        try:
            for result in results:
                for ids, nbytes, raw in result:
                    if ids is None:
                        empty += 1
                    else:
                        builder.add_document(ids, [ids.size])
                        docs += 1
                        tokens += ids.size
                        text_bytes += nbytes
                    if progress:
                        progress.update(docs=1, tokens=0 if ids is None else ids.size, nbytes=raw)
                if max_tokens is not None and tokens >= max_tokens:
                    break
        finally:
            results.close()  # stops the pool when we leave early
        if docs == 0:
            raise DataInputError(prefix, None, "no document has any text to tokenize",
                                 "check the inputs and the --json-key field")
        builder.finalize(idx_tmp)
        os.replace(bin_tmp, prefix + ".bin")
        os.replace(idx_tmp, prefix + ".idx")
    except BaseException:
        if builder is not None:
            builder.data_file.close()
        remove_quietly(bin_tmp, idx_tmp)
        if made_dir:
            try:
                os.rmdir(out_dir)
            except OSError:
                pass
        raise
    finally:
        if progress:
            progress.close()
    return DatasetStats(prefix=prefix, documents=docs, tokens=tokens, text_bytes=text_bytes,
                        empty_documents=empty, dtype=dtype.name,
                        seconds=round(time.monotonic() - start, 3),
                        bin_sha256=file_sha256(prefix + ".bin"),
                        idx_sha256=file_sha256(prefix + ".idx"))


def file_jobs(paths: Sequence[str], input_format: str = "auto",
              text_mode: str = "file") -> Iterator[Job]:
    for path in paths:
        fmt = detect_format(path) if input_format == "auto" else input_format
        for line, raw in iter_records(path, fmt, text_mode):
            yield Job(path, line, raw, fmt)


def preprocess_files(inputs: Sequence[str], output_prefix: str, tokenizer_model: str, *,
                     tokenizer_library: str = "auto", tokenizer_options: Optional[dict] = None,
                     input_format: str = "auto", text_field: str = "text",
                     text_mode: str = "file", workers: int = 1, append_eod: bool = True,
                     prepend_bos: bool = False, show_progress: bool = True) -> DatasetStats:
    """jsonl/text files (globs allowed, .gz read transparently) -> .bin/.idx."""
    paths = expand_inputs(inputs)
    spec = TokenizerSpec(str(tokenizer_model), tokenizer_library, dict(tokenizer_options or {}))
    # Progress counts raw bytes, so a percentage is only known for plain files.
    gz = any(p.endswith(".gz") for p in paths)
    total = None if gz else sum(os.path.getsize(p) for p in paths)
    progress = Progress(f"preprocess {os.path.basename(output_prefix)}", total, show_progress)
    return write_indexed_dataset(file_jobs(paths, input_format, text_mode), output_prefix, spec,
                                 text_field=text_field, workers=workers, append_eod=append_eod,
                                 prepend_bos=prepend_bos, progress=progress)
