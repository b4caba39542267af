"""Tokenizer: round trips and agreement with sentencepiece and megatron-core."""

import json
import shutil
import sys

import numpy
import pytest
import sentencepiece
import torch

from megatron_averis.data.cli import main_train_tokenizer
from megatron_averis.data.sources import DataInputError
from megatron_averis.data.tokenizer import SentencePieceTokenizer, build_tokenizer
from megatron_averis.data.tokenizer_training import (train_sentencepiece,
                                                     train_sentencepiece_from_texts)

# Text the tests tokenize: the vocabulary does not cover all of it, so byte
# fallback is exercised.
TRICKY_TEXTS = [
    "",
    "To be, or not to be: that is the question.",
    "  leading and trailing spaces  ",
    "runs   of    spaces\tand\ttabs\n\n\nand blank lines\n",
    "def f(x):\n    return x ** 2  # indented code\n",
    "Unicode: naïve café, Ελληνικά, 中文字符, emoji 🎉🚀, math ∑∞",
    "\n",
    " ",
    "numbers 1234567890 and 3.14159",
]


@pytest.fixture(scope="module")
def reference(sp_model):
    return sentencepiece.SentencePieceProcessor(model_file=sp_model)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_and_ids_match_sentencepiece(sp_model, reference, text):
    tok = build_tokenizer(sp_model)
    ids = tok.tokenize(text)
    assert ids == reference.encode(text)
    assert tok.detokenize(ids) == text


def test_round_trip_of_real_documents(sp_model, sample_texts):
    tok = build_tokenizer(sp_model)
    for text in sample_texts:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_unseen_characters_use_byte_fallback(sp_model, reference):
    ids = build_tokenizer(sp_model).tokenize("🎉")
    pieces = [reference.id_to_piece(i) for i in ids]
    assert "<0xF0>" in pieces and reference.unk_id() not in ids


def test_special_ids_and_vocab(sp_model, reference):
    tok = build_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == reference.get_piece_size() == 1000
    assert tok.eod == tok.eos == reference.eos_id() == 2
    assert tok.bos == reference.bos_id() == 1
    assert tok.pad == reference.pad_id() == 3
    assert tok.unk == reference.unk_id() == 0
    assert len({tok.eod, tok.bos, tok.pad, tok.unk}) == 4
    assert tok.vocab["</s>"] == 2 and tok.inv_vocab[2] == "</s>"
    assert len(tok.vocab) == tok.vocab_size


def test_detokenize_accepts_arrays_and_tensors(sp_model):
    tok = build_tokenizer(sp_model)
    ids = tok.tokenize("Hello there, world.")
    assert tok.detokenize(numpy.array(ids, dtype=numpy.uint16)) == "Hello there, world."
    assert tok.detokenize(torch.tensor(ids)) == "Hello there, world."


def test_megatron_core_loads_the_same_model(sp_model, reference):
    from megatron.core.tokenizers import MegatronTokenizer

    core = MegatronTokenizer.from_pretrained(sp_model)
    ours = build_tokenizer(sp_model)
    for text in TRICKY_TEXTS[1:]:
        assert core.tokenize(text) == ours.tokenize(text)
    assert (core.eod, core.pad, core.bos, core.vocab_size) == \
        (ours.eod, ours.pad, ours.bos, ours.vocab_size)


def test_unique_identifiers_follow_content_not_path(sp_model, tmp_path):
    copy = tmp_path / "copy.model"
    shutil.copyfile(sp_model, copy)
    a, b = build_tokenizer(sp_model), build_tokenizer(str(copy))
    json.dumps(a.unique_identifiers)
    assert a.unique_identifiers == b.unique_identifiers
    assert json.loads(a.unique_description)["vocab_size"] == "1000"


def test_chat_template_is_refused(sp_model):
    with pytest.raises(NotImplementedError):
        build_tokenizer(sp_model).apply_chat_template([])


def test_unigram_model(tmp_path, sample_texts):
    path = str(tmp_path / "uni.model")
    train_sentencepiece_from_texts(sample_texts, path, vocab_size=800, model_type="unigram")
    ref = sentencepiece.SentencePieceProcessor(model_file=path)
    tok = build_tokenizer(path)
    assert tok.vocab_size == 800
    for text in TRICKY_TEXTS:
        assert tok.tokenize(text) == ref.encode(text)
        assert tok.detokenize(tok.tokenize(text)) == text


def test_same_input_same_model(tmp_path, sample_texts):
    a, b = str(tmp_path / "a.model"), str(tmp_path / "b.model")
    train_sentencepiece_from_texts(sample_texts[:6], a, vocab_size=600)
    train_sentencepiece_from_texts(sample_texts[:6], b, vocab_size=600)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such sentencepiece model"):
        build_tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        build_tokenizer(str(junk))


def test_huggingface_reports_a_missing_library(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        build_tokenizer(str(tmp_path / "tokenizer.json"))


# --- training from files and the CLI ------------------------------------------------
def test_cli_trains_from_jsonl_and_text(tmp_path, write_jsonl, sample_texts, reference):
    jsonl = write_jsonl("docs.jsonl", [{"body": t} for t in sample_texts[:6]])
    out = tmp_path / "cli.model"
    rc = main_train_tokenizer(["--input", jsonl, "--json-key", "body", "--output", str(out),
                               "--vocab-size", "700"])
    assert rc == 0
    tok = build_tokenizer(str(out))
    assert tok.vocab_size == 700 and (tmp_path / "tokenizer_metadata.json").exists()
    txt = tmp_path / "plain.txt"
    txt.write_text("\n\n".join(sample_texts[:6]), encoding="utf-8")
    out2 = tmp_path / "txt.model"
    assert main_train_tokenizer(["-i", str(txt), "-o", str(out2), "--vocab-size", "700",
                                 "--model-type", "unigram", "--text-mode", "paragraph"]) == 0
    tok2 = build_tokenizer(str(out2))
    assert tok2.vocab_size == 700 and tok2.detokenize(tok2.tokenize("Oh!")) == "Oh!"


def test_training_stops_on_bad_input_with_its_line(tmp_path, write_jsonl, sample_texts):
    path = write_jsonl("bad.jsonl", sample_texts[:4] + [{"other": "x"}] + sample_texts[4:6])
    out = tmp_path / "never.model"
    with pytest.raises(DataInputError) as e:
        train_sentencepiece([path], str(out), vocab_size=600)
    assert str(e.value).startswith(f"{path}:5: no field 'text'")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]


def test_training_cli_reports_errors(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    rc = main_train_tokenizer(["-i", str(missing), "-o", str(tmp_path / "x.model")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{missing}: cannot read the file" in err and "Traceback" not in err


def test_vocabulary_too_large_for_the_input(tmp_path):
    with pytest.raises(ValueError, match="lower --vocab-size"):
        train_sentencepiece_from_texts(["just a few words here"], str(tmp_path / "x.model"),
                                       vocab_size=5000)
