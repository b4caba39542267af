"""Tokenizers with megatron-core 0.16.1's interface.

``GPTDatasetConfig.tokenizer`` is typed as megatron-core's
``MegatronTokenizerBase``; the datasets read ``vocab_size``, ``eod``, ``pad``,
``eos`` and ``unique_identifiers`` (for their cache hash). We subclass that
base and also provide the legacy attributes (``vocab``, ``inv_vocab``, ``bos``,
``unique_description``) so code written for either tokenizer system works.

End of document is the model's EOS piece, as with megatron-core's own
sentencepiece wrapper and Megatron-LM's GPTSentencePieceTokenizer, so data
preprocessed here and there agree.
"""

import json
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import numpy
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_averis.data.backends import (HuggingFaceBackend, SentencePieceBackend,
                                           detect_library, file_sha256)


def _as_id_list(ids) -> List[int]:
    if hasattr(ids, "tolist"):  # numpy array or torch tensor
        ids = ids.tolist()
    return [int(i) for i in ids]


class _BackendTokenizer(MegatronTokenizerBase):
    """Shared megatron-core surface over a backend from ``backends.py``."""

    def __init__(self, backend, library: str):
        super().__init__(backend.path, {"library": library, "model_type": "gpt"})
        self._backend = backend
        self._sha256 = file_sha256(backend.path)
        self._vocab: Optional[Dict[str, int]] = None

    # -- encoding --------------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        """Text -> ids, without BOS/EOS (preprocessing appends EOD itself)."""
        return self._backend.encode(text)

    def detokenize(self, ids: Union[Sequence[int], numpy.ndarray]) -> str:
        return self._backend.decode(_as_id_list(ids))

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no chat template: it is for "
                                  "pretraining on plain text")

    # -- vocabulary ------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def vocab(self) -> Dict[str, int]:
        if self._vocab is None:
            self._vocab = {self._backend.id_to_piece(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: p for p, i in self.vocab.items()}

    # -- special tokens (None where the model has none) ------------------
    @property
    def eod(self) -> int:
        return self._backend.eos_id

    @property
    def eos(self) -> int:
        return self._backend.eos_id

    eos_id = eos

    @property
    def bos(self) -> Optional[int]:
        return self._backend.bos_id

    bos_id = bos

    @property
    def pad(self) -> Optional[int]:
        return self._backend.pad_id

    pad_id = pad

    @property
    def unk(self) -> Optional[int]:
        return self._backend.unk_id

    # -- identity, for megatron-core's dataset cache hashes ---------------
    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        # The model's content hash, not its path: a moved model keeps its cache.
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                            ("tokenizer_sha256", self._sha256),
                            ("vocab_size", str(self.vocab_size))])

    @property
    def unique_description(self) -> str:
        return json.dumps(self.unique_identifiers, indent=4)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"eod={self.eod}, bos={self.bos}, pad={self.pad})")


class SentencePieceTokenizer(_BackendTokenizer):
    """A sentencepiece ``.model`` (e.g. from ``tools/train_tokenizer.py``)."""

    def __init__(self, model_path: str):
        super().__init__(SentencePieceBackend(str(model_path)), "sentencepiece")


class HuggingFaceTokenizer(_BackendTokenizer):
    """A HuggingFace ``tokenizer.json`` (needs the ``tokenizers`` package)."""

    def __init__(self, path: str, eod_token: Optional[str] = None,
                 bos_token: Optional[str] = None, pad_token: Optional[str] = None):
        super().__init__(HuggingFaceBackend(str(path), eod_token, bos_token, pad_token),
                         "huggingface")


def build_tokenizer(model_path: str, library: str = "auto", **options) -> _BackendTokenizer:
    """Load a tokenizer; the vocabulary size comes from the model.

    ``library`` is ``sentencepiece``, ``huggingface`` or ``auto`` (a folder or a
    ``.json`` file is HuggingFace, anything else sentencepiece).
    """
    library = detect_library(str(model_path)) if library == "auto" else library
    if library == "sentencepiece":
        if options:
            raise TypeError(f"sentencepiece tokenizers take no options, got {sorted(options)}")
        return SentencePieceTokenizer(model_path)
    if library == "huggingface":
        return HuggingFaceTokenizer(model_path, **options)
    raise ValueError(f"unknown tokenizer library {library!r}; "
                     "use 'sentencepiece', 'huggingface' or 'auto'")
