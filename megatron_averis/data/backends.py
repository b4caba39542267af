"""Light tokenizer backends: encode/decode and special ids, nothing else.

These import only sentencepiece (or HuggingFace ``tokenizers``), never
megatron-core or torch, so preprocessing worker processes start fast. The
megatron-core facing classes in ``tokenizer.py`` wrap them.
"""

import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

LIBRARIES = ("auto", "sentencepiece", "huggingface")
# Tried in order when a HuggingFace tokenizer does not name its end-of-document token.
_HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
_HF_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_HF_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_hf_path(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return path


def detect_library(path: str) -> str:
    path = str(path)
    if os.path.isdir(path) or path.endswith(".json"):
        return "huggingface"
    return "sentencepiece"


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker process needs to rebuild a tokenizer (picklable)."""

    path: str
    library: str = "auto"
    options: Dict[str, str] = field(default_factory=dict)

    def resolved_library(self) -> str:
        return detect_library(self.path) if self.library == "auto" else self.library


class SentencePieceBackend:
    library = "sentencepiece"
    # Threads for batch encoding; pool workers keep 1 to avoid oversubscription.
    threads = 1

    def __init__(self, path: str):
        import sentencepiece

        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: no such sentencepiece model; train one with tools/train_tokenizer.py")
        self.path = str(path)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        if self.sp.eos_id() < 0:
            raise ValueError(f"{path}: the model defines no EOS piece, so documents cannot be "
                             "separated; retrain it with tools/train_tokenizer.py (eos_id=2)")
        self.vocab_size = self.sp.get_piece_size()

    def _opt(self, value: int) -> Optional[int]:
        return None if value < 0 else value

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> Optional[int]:
        return self._opt(self.sp.bos_id())

    @property
    def pad_id(self) -> Optional[int]:
        return self._opt(self.sp.pad_id())

    @property
    def unk_id(self) -> Optional[int]:
        return self._opt(self.sp.unk_id())

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), num_threads=self.threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


class HuggingFaceBackend:
    """A HuggingFace ``tokenizers`` tokenizer.json (or a folder holding one)."""

    library = "huggingface"

    def __init__(self, path: str, eod_token: Optional[str] = None,
                 bos_token: Optional[str] = None, pad_token: Optional[str] = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("HuggingFace tokenizers is not installed; "
                              "pip install tokenizers, or use a sentencepiece model") from None
        self.path = _resolve_hf_path(str(path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such HuggingFace tokenizer.json")
        self.tok = Tokenizer.from_file(self.path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._eos = self._find(eod_token, _HF_EOD_CANDIDATES)
        if self._eos is None:
            raise ValueError(f"{self.path}: cannot tell the end-of-document token; name it with "
                             f"eod_token= (--eod-token); none of {_HF_EOD_CANDIDATES} "
                             "is in the vocabulary")
        self._bos = self._find(bos_token, _HF_BOS_CANDIDATES)
        self._pad = self._find(pad_token, _HF_PAD_CANDIDATES)

    def _find(self, explicit: Optional[str], candidates: Sequence[str]) -> Optional[int]:
        if explicit:
            i = self.tok.token_to_id(explicit)
            if i is None:
                raise ValueError(f"{self.path}: token {explicit!r} is not in the vocabulary")
            return i
        for name in candidates:
            i = self.tok.token_to_id(name)
            if i is not None:
                return i
        return None

    eos_id = property(lambda self: self._eos)
    bos_id = property(lambda self: self._bos)
    pad_id = property(lambda self: self._pad)
    unk_id = property(lambda self: None)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)


def open_backend(spec: TokenizerSpec):
    library = spec.resolved_library()
    if library == "sentencepiece":
        return SentencePieceBackend(spec.path)
    if library == "huggingface":
        return HuggingFaceBackend(spec.path, **spec.options)
    raise ValueError(f"unknown tokenizer library {spec.library!r}; use one of {LIBRARIES}")
