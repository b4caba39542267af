"""Shared fixtures: a small tokenizer trained once per test session."""

import json

import pytest

from megatron_averis.data.embedded import load_documents
from megatron_averis.data.tokenizer_training import train_sentencepiece_from_texts

@pytest.fixture(scope="session")
def sample_texts():
    """A few real documents from the embedded corpus (smallest first)."""
    docs = sorted(load_documents(), key=lambda d: len(d.text))
    return [d.text for d in docs[:12]]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, sample_texts):
    path = str(tmp_path_factory.mktemp("tok") / "small.model")
    train_sentencepiece_from_texts(sample_texts, path, vocab_size=1000, model_type="bpe")
    return path


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name, records, key="text"):
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r if isinstance(r, dict) else {key: r}) + "\n")
        return str(path)

    return write

