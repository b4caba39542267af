"""The embedded corpus: public-domain text shipped in the repository.

``corpus/embedded.jsonl.gz`` holds Shakespeare's 38 plays and Ambrose
Bierce's *The Devil's Dictionary* (provenance and licence in
``corpus/SOURCES.md``), each document marked ``train`` or ``valid``.

``prepare_embedded_corpus(out_dir)`` trains a tokenizer on the train split
and writes train/valid indexed datasets, once: the result lives in a folder
named after a hash of the corpus file and the settings, built under a
temporary name and renamed into place, so concurrent callers (several ranks)
and interrupted builds are safe, and later calls return at once.
"""

import gzip
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Union

from megatron_averis.data.atomic import temp_path

CORPUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus",
                           "embedded.jsonl.gz")
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MODEL_TYPE = "bpe"
# Bump when the build changes in a way that changes its output.
BUILD_VERSION = 1


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    split: str
    text: str


def load_documents() -> List[Document]:
    """All embedded documents, sorted by id."""
    with gzip.open(CORPUS_FILE, "rt", encoding="utf-8") as f:
        docs = [Document(**json.loads(line)) for line in f]
    return sorted(docs, key=lambda d: d.id)


def corpus_sha256() -> str:
    with open(CORPUS_FILE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _build(build_dir: str, vocab_size: int, model_type: str, key: Dict) -> None:
    from megatron_averis.data.backends import TokenizerSpec
    from megatron_averis.data.indexed import Job, write_indexed_dataset
    from megatron_averis.data.tokenizer_training import train_sentencepiece_from_texts

    start = time.monotonic()
    docs = load_documents()
    model = os.path.join(build_dir, "tokenizer.model")
    # The tokenizer sees only the train split, so validation text stays unseen.
    train_sentencepiece_from_texts((d.text for d in docs if d.split == "train"), model,
                                   vocab_size=vocab_size, model_type=model_type,
                                   source_name="the embedded corpus")
    spec = TokenizerSpec(model, "sentencepiece")
    splits = {}
    for split in ("train", "valid"):
        jobs = (Job(d.id, 1, d.text, "str") for d in docs if d.split == split)
        stats = write_indexed_dataset(jobs, os.path.join(build_dir, split), spec, workers=1)
        splits[split] = stats.as_dict()
    manifest = {
        "corpus": "embedded", "build_version": BUILD_VERSION, **key,
        "tokenizer_sha256": _file_sha256(model),
        "splits": splits,
        "documents": {s: [d.id for d in docs if d.split == s] for s in ("train", "valid")},
        "build_seconds": round(time.monotonic() - start, 2),
    }
    with open(os.path.join(build_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _result(build_dir: str) -> Dict[str, Union[str, int, float]]:
    with open(os.path.join(build_dir, "manifest.json"), encoding="utf-8") as f:
        m = json.load(f)
    train, valid = m["splits"]["train"], m["splits"]["valid"]
    return {
        "dir": build_dir,
        "tokenizer_model": os.path.join(build_dir, "tokenizer.model"),
        "train_prefix": os.path.join(build_dir, "train"),
        "valid_prefix": os.path.join(build_dir, "valid"),
        "vocab_size": m["vocab_size"],
        "train_documents": train["documents"], "valid_documents": valid["documents"],
        "train_tokens": train["tokens"], "valid_tokens": valid["tokens"],
        "bytes_per_token": train["bytes_per_token"],
        "manifest": os.path.join(build_dir, "manifest.json"),
    }


def prepare_embedded_corpus(out_dir: str = os.path.join("data", "cache", "embedded"),
                            vocab_size: int = DEFAULT_VOCAB_SIZE,
                            model_type: str = DEFAULT_MODEL_TYPE) -> Dict:
    """Tokenizer and train/valid datasets of the embedded corpus, built on first use.

    Returns a dict with absolute paths: ``tokenizer_model`` (sentencepiece
    .model; load it with ``build_tokenizer``), ``train_prefix`` and
    ``valid_prefix`` (indexed-dataset prefixes, without .bin/.idx), ``dir``,
    ``manifest``; and figures: ``vocab_size``, ``train_tokens``,
    ``valid_tokens``, ``train_documents``, ``valid_documents``,
    ``bytes_per_token``.
    """
    key = {"corpus_sha256": corpus_sha256(), "vocab_size": int(vocab_size),
           "model_type": model_type, "build_version": BUILD_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out_dir = os.path.abspath(out_dir)
    build_dir = os.path.join(out_dir, f"{model_type}{vocab_size}-{digest}")
    if os.path.isfile(os.path.join(build_dir, "manifest.json")):
        return _result(build_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = temp_path(build_dir)
    os.makedirs(tmp)
    try:
        _build(tmp, vocab_size, model_type, key)
        try:
            os.rename(tmp, build_dir)
        except OSError:
            # Another process finished first; use its (identical) build.
            if not os.path.isfile(os.path.join(build_dir, "manifest.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _result(build_dir)
