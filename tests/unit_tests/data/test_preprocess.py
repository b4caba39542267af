"""Preprocessing: output read back by megatron-core's own dataset classes."""

import gzip
import hashlib
import json
import os

import numpy
import pytest
import sentencepiece
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_averis.data.cli import main_preprocess
from megatron_averis.data.indexed import preprocess_files
from megatron_averis.data.tokenizer import build_tokenizer

DOCS = [
    "First document. It is short.",
    "Second document,\nwith two lines and ünïcödé 中文 🎉.",
    "",  # empty: skipped, not written as a lone EOD
    "Fourth:   spaces\tand tabs\n\n",
    "def code():\n    return 42\n",
]


@pytest.fixture(scope="module")
def ref(sp_model):
    return sentencepiece.SentencePieceProcessor(model_file=sp_model)


def expected_sequences(ref, texts):
    """Independent reference: sentencepiece ids plus EOS, per non-empty document."""
    return [ref.encode(t) + [ref.eos_id()] for t in texts if ref.encode(t)]


def read_back(prefix):
    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_jsonl_documents_read_back_by_indexed_dataset(tmp_path, write_jsonl, sp_model, ref):
    path = write_jsonl("in.jsonl", [{"content": t, "id": i} for i, t in enumerate(DOCS)])
    prefix = str(tmp_path / "out" / "corpus")
    stats = preprocess_files([path], prefix, sp_model, text_field="content",
                             show_progress=False)
    ds, seqs = read_back(prefix)
    want = expected_sequences(ref, DOCS)
    assert seqs == want
    assert ds.index.dtype == numpy.uint16
    # One sequence per document: document boundaries are sequence boundaries.
    assert ds.document_indices.tolist() == list(range(len(want) + 1))
    assert stats.documents == len(want) and stats.empty_documents == 1
    assert stats.tokens == sum(map(len, want))
    assert stats.text_bytes == sum(len(t.encode()) for t in DOCS)


def test_workers_do_not_change_the_output(tmp_path, write_jsonl, sp_model, sample_texts):
    # Enough documents for several batches, so ordering across processes matters.
    texts = [t[: 200 + 37 * i] for i, t in enumerate(sample_texts * 60)]
    path = write_jsonl("many.jsonl", texts)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    preprocess_files([path], one, sp_model, workers=1, show_progress=False)
    from megatron_averis.data import indexed

    # Small batches: many batches in flight over the two worker processes.
    jobs = indexed.file_jobs([path])
    from megatron_averis.data.backends import TokenizerSpec

    indexed.write_indexed_dataset(jobs, two, TokenizerSpec(sp_model), workers=2, batch_docs=7)
    assert sha(one + ".bin") == sha(two + ".bin")
    assert sha(one + ".idx") == sha(two + ".idx")


@pytest.mark.parametrize("mode,count", [("file", 1), ("paragraph", 3), ("line", 4)])
def test_text_modes(tmp_path, sp_model, ref, mode, count):
    src = tmp_path / "a.txt"
    text = "para one line one\npara one line two\n\n\npara two\n\npara three\n"
    src.write_text(text, encoding="utf-8")
    prefix = str(tmp_path / mode)
    preprocess_files([str(src)], prefix, sp_model, text_mode=mode, show_progress=False)
    _, seqs = read_back(prefix)
    assert len(seqs) == count
    if mode == "file":
        assert seqs == expected_sequences(ref, [text])
    if mode == "paragraph":
        assert seqs[1] == expected_sequences(ref, ["para two\n"])[0]


def test_gzip_and_glob_inputs(tmp_path, sp_model, ref):
    for i in range(3):
        with gzip.open(tmp_path / f"part{i}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(json.dumps({"text": f"document number {i}"}) + "\n")
    prefix = str(tmp_path / "gz")
    preprocess_files([str(tmp_path / "part*.jsonl.gz")], prefix, sp_model, show_progress=False)
    _, seqs = read_back(prefix)
    assert seqs == expected_sequences(ref, [f"document number {i}" for i in range(3)])


def test_prepend_bos_and_no_eod(tmp_path, write_jsonl, sp_model, ref):
    path = write_jsonl("x.jsonl", ["alpha beta", "gamma"])
    prefix = str(tmp_path / "bos")
    preprocess_files([path], prefix, sp_model, prepend_bos=True, append_eod=False,
                     show_progress=False)
    _, seqs = read_back(prefix)
    assert seqs == [[ref.bos_id()] + ref.encode("alpha beta"), [ref.bos_id()] + ref.encode("gamma")]


def test_cli_prints_stats(tmp_path, write_jsonl, sp_model, capsys):
    path = write_jsonl("c.jsonl", ["one doc", "two doc"])
    rc = main_preprocess(["-i", path, "-o", str(tmp_path / "cli"), "--tokenizer-model", sp_model,
                          "-j", "1", "-q"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 2 and stats["prefix"] == "cli" and stats["dtype"] == "uint16"
    assert stats["bin_sha256"] == sha(str(tmp_path / "cli.bin"))


def test_gpt_dataset_samples_respect_document_boundaries(tmp_path, write_jsonl, sp_model, ref,
                                                          sample_texts):
    texts = [t[:3000] for t in sample_texts[:8]]
    path = write_jsonl("gpt.jsonl", texts)
    prefix = str(tmp_path / "gpt")
    preprocess_files([path], prefix, sp_model, show_progress=False)
    tok = build_tokenizer(sp_model)
    seq_len = 64
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq_len, blend=([prefix], None),
                              split="1,0,0", path_to_cache=str(tmp_path / "cache"),
                              tokenizer=tok, reset_position_ids=True, reset_attention_mask=True,
                              eod_mask_loss=True)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [40, None, None], lambda: True,
                                                config).build()
    docs = expected_sequences(ref, texts)
    stream_docs = [numpy.array(d[:-1]) for d in docs]  # document tokens without EOD
    eod = tok.eod

    def is_slice_of_a_doc(segment, where):
        for d in stream_docs:
            n = len(segment)
            if n == 0:
                return True
            if where == "prefix" and d[:n].tolist() == segment:
                return True
            if where == "suffix" and d[len(d) - n:].tolist() == segment:
                return True
            if where == "inside" and any(d[i:i + n].tolist() == segment
                                         for i in range(len(d) - n + 1)):
                return True
        return False

    seen_eod = False
    for i in range(len(train)):
        sample = train[i]
        tokens = sample["tokens"].tolist() + [sample["labels"].tolist()[-1]]
        cuts = [j for j, t in enumerate(tokens) if t == eod]
        seen_eod |= bool(cuts)
        bounds = [-1] + cuts + [len(tokens)]
        for k in range(len(bounds) - 1):
            segment = tokens[bounds[k] + 1:bounds[k + 1]]
            if k == 0 and k == len(bounds) - 2:
                assert is_slice_of_a_doc(segment, "inside")
            elif k == 0:
                assert is_slice_of_a_doc(segment, "suffix")   # text right before an EOD
            elif k == len(bounds) - 2:
                assert is_slice_of_a_doc(segment, "prefix")   # text right after an EOD
            else:
                assert segment in [d.tolist() for d in stream_docs]
        # Loss is masked on EOD and positions restart after it.
        loss_mask = sample["loss_mask"].tolist()
        for j in cuts:
            if j < seq_len:
                assert loss_mask[j] == 0
            if j + 1 < seq_len:
                assert sample["position_ids"][j + 1].item() == 0
    assert seen_eod


@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory, sample_texts):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_texts, trainer)
    path = str(tmp_path_factory.mktemp("hf") / "tokenizer.json")
    tok.save(path)
    return path


def test_huggingface_tokenizer(tmp_path, write_jsonl, hf_tokenizer_json):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(hf_tokenizer_json)
    eod = ref.token_to_id("<|endoftext|>")
    tok = build_tokenizer(hf_tokenizer_json)
    assert (tok.eod, tok.pad, tok.vocab_size) == (eod, ref.token_to_id("<pad>"),
                                                  ref.get_vocab_size())
    for text in DOCS:
        assert tok.detokenize(tok.tokenize(text)) == text
    path = write_jsonl("hf.jsonl", DOCS)
    prefix = str(tmp_path / "hf")
    # A folder holding tokenizer.json works too; two workers exercise the pool.
    preprocess_files([path], prefix, os.path.dirname(hf_tokenizer_json), workers=2,
                     show_progress=False)
    _, seqs = read_back(prefix)
    want = [ref.encode(t, add_special_tokens=False).ids + [eod] for t in DOCS if t]
    assert seqs == want
