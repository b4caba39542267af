"""Training a sentencepiece tokenizer (BPE or unigram) with byte fallback.

Settings chosen so that ``decode(encode(text)) == text`` for any text:
identity normalisation, whitespace kept as is, byte fallback for characters
outside the vocabulary. Special ids are fixed (unk 0, BOS 1, EOS 2, pad 3)
so that the pad id never collides with EOD.
"""

import io
import json
import os
from typing import Iterable, Iterator, Optional, Sequence

from megatron_averis.data.atomic import temp_path
from megatron_averis.data.sources import DataInputError, expand_inputs, iter_documents

MODEL_TYPES = ("bpe", "unigram")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Lines longer than this (bytes) are left out of training (not of encoding).
MAX_SENTENCE_BYTES = 8192
# sentencepiece's result depends on its thread count (measured: 1, 2 and 4
# threads give three different models from one input), so the default is a
# constant rather than the machine's core count: equal inputs, equal models.
DEFAULT_TRAIN_THREADS = 4


def _sentences(texts: Iterable[str], max_sentences: Optional[int],
               max_bytes: Optional[int]) -> Iterator[str]:
    """Non-blank lines of the documents, in order, up to the given caps.

    sentencepiece trains on lines; a newline itself is encoded through byte
    fallback (one token), so it needs no vocabulary entry.
    """
    n = nbytes = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            size = len(line.encode("utf-8"))
            if size > MAX_SENTENCE_BYTES:
                continue
            if max_sentences is not None and n >= max_sentences:
                return
            if max_bytes is not None and nbytes >= max_bytes:
                return
            n += 1
            nbytes += size
            yield line


def train_sentencepiece_from_texts(texts: Iterable[str], output_model: str,
                                   vocab_size: int = 8192, model_type: str = "bpe",
                                   character_coverage: float = 0.9999,
                                   max_sentences: Optional[int] = None,
                                   max_bytes: Optional[int] = None,
                                   num_threads: int = DEFAULT_TRAIN_THREADS,
                                   source_name: str = "the input") -> str:
    """Train on document texts; write ``output_model`` atomically; return its path.

    Training is deterministic for a given input and thread count (the input is
    not shuffled or sampled by sentencepiece: pass a prepared order and the
    caps instead).
    """
    import sentencepiece

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs "
                         "256 pieces plus the 4 special ones; use at least 300")
    counted = {"n": 0, "error": None}

    def counting(it):
        # An exception raised inside sentencepiece's C++ loop would lose its
        # message: keep it, end the input, and raise it after training.
        try:
            for s in it:
                counted["n"] += 1
                yield s
        except Exception as e:  # noqa: BLE001 - re-raised below
            counted["error"] = e

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=counting(_sentences(texts, max_sentences, max_bytes)),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        if counted["error"] is not None:
            raise counted["error"]
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        if counted["n"] == 0:
            raise DataInputError(source_name, None, "no text to train on",
                                 "give files with non-blank lines") from None
        raise ValueError(f"sentencepiece training on {source_name} failed: {msg}. "
                         "If the vocabulary is too large for this much text, "
                         "lower --vocab-size") from None
    if counted["error"] is not None:
        raise counted["error"]
    _write_atomic(output_model, model.getvalue())
    write_megatron_metadata(output_model)
    return output_model


def train_sentencepiece(inputs: Sequence[str], output_model: str, vocab_size: int = 8192,
                        model_type: str = "bpe", input_format: str = "auto",
                        text_field: str = "text", text_mode: str = "file", **kwargs) -> str:
    """Train from jsonl/text files (globs allowed); see the ``_from_texts`` variant."""
    paths = expand_inputs(inputs)
    texts = iter_documents(paths, input_format, text_field, text_mode)
    return train_sentencepiece_from_texts(texts, output_model, vocab_size, model_type,
                                          source_name=", ".join(paths), **kwargs)


def write_megatron_metadata(model_path: str) -> str:
    """Write ``tokenizer_metadata.json`` beside the model, so that megatron-core's
    ``MegatronTokenizer.from_pretrained(model_path)`` loads it too. The content
    names only the library, so models sharing a folder share it safely."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "tokenizer_metadata.json")
    meta = {"library": "sentencepiece", "class_name": None, "class_path": None,
            "model_type": "gpt", "chat_template": None}
    _write_atomic(path, json.dumps(meta).encode("utf-8"))
    return path


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
