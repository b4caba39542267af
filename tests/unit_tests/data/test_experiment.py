"""The experiment-corpus builder, at a small scale on a made-up source tree."""

import hashlib
import json
import os

import pytest
import sentencepiece
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_averis.data import experiment
from megatron_averis.data.cli import main_experiment

SMALL = dict(vocab_size=600, tokenizer_sample_bytes=300_000, max_tokens=40_000,
             use_default_roots=False, workers=1, show_progress=False)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgs")
    files = {
        "pkg/__init__.py": "",                                          # empty: skipped
        "pkg/core.py": "def add(a, b):\n    return a + b\n" * 40,
        "pkg/copy_of_core.py": "def add(a, b):\n    return a + b\n" * 40,  # duplicate
        "pkg/README.md": "# pkg\n\nA package that adds numbers.\n" * 20,
        "pkg/data.bin.txt": "x\x00y",                                  # binary
        "pkg/minified.py": "x = 1;" * 400,                              # long line
        "pkg/notes.rst": "Notes\n=====\n\nSome prose about the package.\n" * 30,
        "pkg/__pycache__/core.cpython-311.py": "ignored = True\n",     # cache dir
        "pkg/image.png": "not text",                                    # extension
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    (root / "pkg" / "latin1.txt").write_bytes(b"caf\xe9\n")             # not UTF-8
    for i in range(150):
        (root / "pkg" / f"mod{i:03d}.py").write_text(
            f'"""Module {i}."""\n\nVALUE_{i} = {i * 7}\n\n\ndef f{i}(x):\n    return x + {i}\n',
            encoding="utf-8")
    return str(root)


@pytest.fixture(scope="module")
def built(tmp_path_factory, source_tree):
    out = str(tmp_path_factory.mktemp("exp") / "corpus")
    manifest = experiment.build_experiment_corpus(out, extra_roots=[source_tree], **SMALL)
    return out, manifest


def test_build_outputs_and_manifest(built, source_tree):
    out, m = built
    assert sorted(os.listdir(out)) == ["documents.tsv", "manifest.json", "tokenizer.model",
                                       "tokenizer_metadata.json", "train.bin", "train.idx",
                                       "valid.bin", "valid.idx"]
    assert json.load(open(os.path.join(out, "manifest.json"))) == m
    assert m["scan"]["skipped"] == {"binary": 1, "duplicate": 1, "empty": 1, "long_lines": 1,
                                    "not_utf8": 1}
    # 150 modules + core.py + README.md + notes.rst
    assert m["scan"]["by_root"][f"extra-1-{os.path.basename(source_tree)}"]["files"] == 153
    assert m["tokenizer"]["vocab_size"] == 600 and m["settings"]["max_tokens"] == 40_000
    for split in ("train", "valid"):
        s = m["splits"][split]
        ds = IndexedDataset(os.path.join(out, split))
        assert len(ds) == s["documents"] and sum(ds.sequence_lengths) == s["tokens"]
        digest = hashlib.sha256(open(os.path.join(out, split + ".bin"), "rb").read()).hexdigest()
        assert digest == s["bin_sha256"]
    assert m["splits"]["train"]["tokens"] >= 40_000
    assert not m["meets_min_tokens"]
    assert m["tool_versions"]["sentencepiece"] == sentencepiece.__version__


def test_documents_tsv_matches_the_token_stream(built, source_tree):
    out, m = built
    rows = [line.rstrip("\n").split("\t")
            for line in open(os.path.join(out, "documents.tsv"), encoding="utf-8")][1:]
    train = [r for r in rows if r[0] == "train"]
    assert len(train) == m["splits"]["train"]["documents"]
    # Labels are relative: no path of this machine is written anywhere.
    for name in ("documents.tsv", "manifest.json"):
        assert os.path.dirname(out) not in open(os.path.join(out, name), encoding="utf-8").read()
    # Rows are in canonical order: sha256 of the label, ascending.
    keys = [hashlib.sha256(r[1].encode()).hexdigest() for r in train]
    assert keys == sorted(keys)
    # The first train document, re-encoded with sentencepiece itself, is the first sequence.
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    label = train[0][1]
    # Keep the dataset alive while reading: its __del__ closes the mmap under the array.
    ds = IndexedDataset(os.path.join(out, "train"))
    first = ds[0].tolist()
    if label.startswith("embedded/"):
        from megatron_averis.data.embedded import load_documents

        text = {("embedded/" + d.id): d.text for d in load_documents()}[label]
    else:
        rel = label.split("/", 1)[1]
        text = open(os.path.join(source_tree, rel), encoding="utf-8").read()
    assert first == sp.encode(text) + [sp.eos_id()]


def test_two_builds_have_equal_checksums(built, tmp_path, source_tree):
    _, m = built
    again = experiment.build_experiment_corpus(str(tmp_path / "again"),
                                               extra_roots=[source_tree], **SMALL)
    for key in ("text_sha256", "corpus_sha256"):
        assert again[key] == m[key]
    assert again["tokenizer"]["sha256"] == m["tokenizer"]["sha256"]


def test_existing_output_needs_overwrite(built, source_tree, capsys):
    out, _ = built
    rc = main_experiment(["--out-dir", out, "--no-default-roots", "--extra-root", source_tree,
                          "--max-tokens", "1000", "-q"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_cli_builds_with_a_given_tokenizer(built, tmp_path, source_tree, capsys):
    out, m = built
    target = str(tmp_path / "cli")
    rc = main_experiment(["--out-dir", target, "--no-default-roots", "--extra-root", source_tree,
                          "--tokenizer-model", os.path.join(out, "tokenizer.model"),
                          "--max-tokens", "5000", "-j", "2", "-q"])
    text = capsys.readouterr().out
    assert rc == 0 and "corpus_sha256" in text and "bytes/token" in text
    m2 = json.load(open(os.path.join(target, "manifest.json")))
    assert m2["tokenizer"]["sha256"] == m["tokenizer"]["sha256"]
    assert m2["tokenizer"]["source"] == "given"


def test_default_roots_are_the_stdlib_and_site_packages():
    roots = experiment.default_roots()
    assert roots[0][0] == "stdlib" and os.path.isfile(os.path.join(roots[0][1], "os.py"))
    assert any(label == "site-packages" for label, _ in roots)
    assert all(os.path.isdir(p) for _, p in roots)
