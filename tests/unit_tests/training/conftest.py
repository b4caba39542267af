"""Fixtures for the pretraining-program tests. Helpers live in pretrain_launcher.py."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The embedded corpus with a 1024-piece tokenizer (built once per session, ~15 s)."""
    from megatron_averis.data.embedded import prepare_embedded_corpus

    return prepare_embedded_corpus(str(tmp_path_factory.mktemp("embedded")), vocab_size=1024)
