"""The fixed batch the checkpoint diagnostics run on: token windows of an indexed dataset (the
run's validation data by default), read as the trainer's samples are, across document ends."""

from __future__ import annotations

import os

import numpy as np
import torch


def data_prefix(config: dict) -> str:
    """The run's validation data (else its training blend's first prefix)."""
    from megatron_averis.training.data import parse_blend

    for key in ("valid_data_path", "data_path", "train_data_path"):
        blend = parse_blend(config.get(key))
        if blend:
            return blend[0][0]
    raise ValueError("the run's configuration names no data; pass --data-prefix")


def _open(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise FileNotFoundError(f"no indexed dataset {prefix}.bin/.idx; pass --data-prefix")
    return IndexedDataset(prefix)


def _stream_slice(ds, doc_starts: np.ndarray, start: int, length: int) -> np.ndarray:
    """`length` tokens from position `start` of the documents concatenated in order."""
    doc = int(np.searchsorted(doc_starts, start, side="right")) - 1
    offset, parts, have = start - int(doc_starts[doc]), [], 0
    while have < length:
        part = np.asarray(ds.get(doc, offset, min(length - have,
                                                  int(ds.sequence_lengths[doc]) - offset)),
                          dtype=np.int64)
        parts.append(part)
        have += len(part)
        doc, offset = doc + 1, 0
    return np.concatenate(parts)


def batch_tokens(prefix: str, batch: int, seq: int, seed: int | None = None) -> torch.Tensor:
    """[batch, seq + 1] tokens of an indexed dataset, its documents concatenated in order.

    seed None: the first batch x (seq + 1) tokens. seed s: `batch` distinct windows among the
    stream's consecutive (seq + 1)-token windows, drawn by numpy's default_rng(s), in drawn order.
    """
    if batch < 1 or seq < 1:
        raise ValueError(f"--batch-size ({batch}) and --seq-length ({seq}) must be at least 1")
    ds = _open(prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)])
    windows = int(doc_starts[-1]) // (seq + 1)
    if windows < batch:
        raise ValueError(f"{prefix} holds {int(doc_starts[-1])} tokens, fewer than --batch-size x "
                         f"(--seq-length + 1) = {batch * (seq + 1)}")
    picks = range(batch) if seed is None else np.random.default_rng(seed).choice(
        windows, size=batch, replace=False)
    rows = [_stream_slice(ds, doc_starts, int(w) * (seq + 1), seq + 1) for w in picks]
    return torch.from_numpy(np.stack(rows))
