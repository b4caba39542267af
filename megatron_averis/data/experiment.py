"""The experiment corpus: built offline from what the machine has installed.

Sources: the embedded public-domain text (``embedded.py``), public-domain
prose read from downloaded package files (``natural_packages.py``), plus the
source and documentation files of the Python standard library and of the
installed packages (site-packages). Nothing is downloaded here, so this runs
on a machine without network. The content depends on the installed package versions, so
the manifest lists every distribution used (name, version, licence), and
checksums let two builds be compared: equal ``text_sha256`` means the same
text, equal ``corpus_sha256`` the same .bin/.idx bytes.

Determinism: files are walked in sorted order, filtered by fixed rules,
de-duplicated by content, then ordered by the sha256 of their label
(``site-packages/torch/nn/modules/linear.py``), which mixes sources evenly and
does not depend on the machine's paths. The same hash puts 1 % of documents in
the validation split. ``natural_fraction`` drops code documents to reach a
share of natural-language tokens, and the tokenizer is trained on about
``tokenizer_sample_bytes`` of training documents drawn from each source in
proportion (``mix.py``).

The built corpus holds third-party code under its own licences (listed in the
manifest): use it for experiments on the machine, do not redistribute it.
"""

import hashlib
import json
import os
import platform
import shutil
import site
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_averis.data.atomic import temp_path
from megatron_averis.data.backends import file_sha256
from megatron_averis.data.mix import (check_fraction, format_mix, mix_table,
                                      select_natural_fraction, tokenizer_sample)
from megatron_averis.data.natural_packages import PackageText, licence_of, read_packages

DEFAULT_VOCAB_SIZE = 32768
DEFAULT_TOKENIZER_SAMPLE_BYTES = 64 << 20
DEFAULT_MIN_TOKENS = 50_000_000
BUILDER_VERSION = 2  # 2: natural-text packages, per-source tokenizer sample
EXTENSIONS = (".py", ".pyi", ".md", ".rst", ".txt", ".c", ".h", ".cc", ".cpp", ".hpp",
              ".cu", ".cuh")
NATURAL_LANGUAGE_EXTENSIONS = (".md", ".rst", ".txt")
MAX_FILE_BYTES = 1 << 20      # larger files are mostly generated tables
MAX_LINE_CHARS = 1000         # longer lines mean minified or embedded data
VALID_MODULUS = 100           # 1 document in 100 goes to validation
SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".mypy_cache", ".pytest_cache"}


@dataclass
class SourceDoc:
    key: str        # sha256 of label, the sort key
    label: str      # root label / relative path: never an absolute path
    kind: str       # 'natural' (prose) or 'code'
    text: str
    sha256: str     # of the text's bytes
    source: str     # embedded, stdlib, site-packages, natural/<package>, extra-...
    nbytes: int = 0  # UTF-8 bytes of the text (filled in)

    def __post_init__(self):
        self.nbytes = len(self.text.encode("utf-8"))

    @property
    def split(self) -> str:
        return "valid" if int(self.key[:8], 16) % VALID_MODULUS == 0 else "train"


def _key(label: str) -> str:
    return hashlib.sha256(label.encode("utf-8")).hexdigest()


# --- discovering roots and distributions -----------------------------------------
def default_roots() -> List[Tuple[str, str]]:
    """(label, path) for the stdlib and each site-packages folder, outermost
    first, without duplicates or nesting."""
    stdlib = sysconfig.get_paths()["stdlib"]
    sites = []
    for p in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
              *getattr(site, "getsitepackages", lambda: [])()]:
        if p and os.path.isdir(p) and \
                os.path.realpath(p) not in [os.path.realpath(s) for s in sites]:
            sites.append(p)
    roots = [("stdlib", stdlib)]
    for i, p in enumerate(sorted(sites, key=os.path.realpath)):
        roots.append(("site-packages" if i == 0 else f"site-packages-{i + 1}", p))
    return roots


def _distribution_map(roots: Sequence[Tuple[str, str]]) -> Dict[str, Tuple[str, str, str]]:
    """Normalised path of each file -> (name, version, licence) of the
    distribution that installed it."""
    from importlib import metadata

    owner = {}
    for _, root in roots:
        for dist in metadata.distributions(path=[root]):
            md = dist.metadata  # parsed on every access: read it once
            entry = (md.get("Name") or "unknown", md.get("Version") or "", licence_of(md))
            for f in dist.files or []:
                owner[os.path.normpath(os.path.join(root, str(f)))] = entry
    return owner


# --- scanning ----------------------------------------------------------------------
def _walk(root: str, skip: Iterable[str]) -> Iterable[str]:
    skip_real = {os.path.realpath(s) for s in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in skip_real)
        for name in sorted(filenames):
            if name.endswith(EXTENSIONS):
                yield os.path.join(dirpath, name)


def _check_text(data: bytes) -> Tuple[Optional[str], Optional[str]]:
    """(text, None) if the file is usable, else (None, reason)."""
    if not data.strip():
        return None, "empty"
    if len(data) > MAX_FILE_BYTES:
        return None, "too_large"
    if b"\x00" in data:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    if max(len(line) for line in text.split("\n")) > MAX_LINE_CHARS:
        return None, "long_lines"
    return text, None


def _add_natural(docs: List[SourceDoc], seen: set, skipped: Dict[str, int], source: str,
                 named_texts: Iterable[Tuple[str, str]]) -> Dict[str, int]:
    """Append prose documents (deduplicated by content); return their count and bytes."""
    stat = {"files": 0, "bytes": 0}
    for name, text in named_texts:
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if sha in seen:
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            continue
        seen.add(sha)
        label = f"{source}/{name}"
        docs.append(SourceDoc(_key(label), label, "natural", text, sha, source))
        stat["files"] += 1
        stat["bytes"] += docs[-1].nbytes
    return stat


def scan_sources(roots: Sequence[Tuple[str, str]], include_embedded: bool = True,
                 progress: bool = True, natural_packages: Sequence[PackageText] = ()
                 ) -> Tuple[List[SourceDoc], dict]:
    """All usable documents in canonical order, and the scan's statistics."""
    from megatron_averis.data.embedded import load_documents

    docs: List[SourceDoc] = []
    seen = set()
    skipped: Dict[str, int] = {}
    by_root: Dict[str, Dict[str, int]] = {}
    dists: Dict[Tuple[str, str, str], Dict[str, int]] = {}
    if include_embedded:
        by_root["embedded"] = _add_natural(docs, seen, skipped, "embedded",
                                           ((d.id, d.text) for d in load_documents()))
    packages = []
    for pkg in natural_packages:
        stat = _add_natural(docs, seen, skipped, pkg.source, pkg.documents)
        by_root[pkg.source] = stat
        packages.append({"name": pkg.name, "version": pkg.version, "license": pkg.licence,
                         "content_license": pkg.content_licence, "file": pkg.file,
                         "sha256": pkg.sha256, **stat})
    owner = _distribution_map([r for r in roots if r[0].startswith("site-packages")])
    root_paths = [p for _, p in roots]
    t0, scanned = time.monotonic(), 0
    for label, root in roots:
        nested = [p for p in root_paths if p != root and
                  os.path.realpath(p).startswith(os.path.realpath(root) + os.sep)]
        if label == "stdlib":
            # Some layouts keep a site-packages inside the stdlib folder (pyenv,
            # venvs' base interpreters): packages are never labelled stdlib.
            nested += [os.path.join(root, "site-packages"), os.path.join(root, "dist-packages")]
        stat = by_root.setdefault(label, {"files": 0, "bytes": 0})
        for path in _walk(root, nested):
            scanned += 1
            if progress and scanned % 5000 == 0:
                print(f"scan: {scanned} files, {len(docs)} kept, {time.monotonic() - t0:.0f}s",
                      file=sys.stderr, flush=True)
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_FILE_BYTES + 1)
            except OSError:
                skipped["unreadable"] = skipped.get("unreadable", 0) + 1
                continue
            text, reason = _check_text(data)
            if text is None:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                skipped["duplicate"] = skipped.get("duplicate", 0) + 1
                continue
            seen.add(sha)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            name = f"{label}/{rel}"
            kind = "natural" if path.endswith(NATURAL_LANGUAGE_EXTENSIONS) else "code"
            docs.append(SourceDoc(_key(name), name, kind, text, sha, label))
            stat["files"] += 1
            stat["bytes"] += len(data)
            if label.startswith("site-packages"):
                dist = owner.get(os.path.normpath(path), ("(no distribution)", "", ""))
            else:
                dist = ("python-stdlib", platform.python_version(), "PSF-2.0")
            d = dists.setdefault(dist, {"files": 0, "bytes": 0})
            d["files"] += 1
            d["bytes"] += len(data)
    docs.sort(key=lambda d: d.key)
    stats = {
        "files_scanned": scanned, "documents": len(docs), "skipped": dict(sorted(skipped.items())),
        "by_root": by_root,
        "natural_packages": packages,
        "distributions": [{"name": n, "version": v, "license": lic, **c}
                          for (n, v, lic), c in sorted(dists.items(),
                                                       key=lambda x: (x[0][0].lower(), x[0][1]))],
        "seconds": round(time.monotonic() - t0, 2),
    }
    return docs, stats


# --- building --------------------------------------------------------------------------
def _text_sha256(docs: Iterable[SourceDoc]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.text.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def build_experiment_corpus(out_dir: str, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                            tokenizer_model: Optional[str] = None,
                            tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
                            max_tokens: Optional[int] = None,
                            min_tokens: int = DEFAULT_MIN_TOKENS,
                            extra_roots: Sequence[str] = (), use_default_roots: bool = True,
                            natural_packages: Sequence[str] = (),
                            natural_fraction: Optional[float] = None,
                            include_embedded: bool = True, workers: int = 1,
                            overwrite: bool = False, show_progress: bool = True) -> dict:
    """Build into ``out_dir`` (tokenizer.model, train/valid .bin/.idx,
    manifest.json, documents.tsv) and return the manifest.

    ``natural_packages``: downloaded package files (or folders of them) whose
    prose joins the corpus; ``natural_fraction``: target share of
    natural-language tokens per split, reached by dropping code (``mix.py``).
    """
    from megatron_averis.data.backends import TokenizerSpec
    from megatron_averis.data.indexed import Job, iter_token_counts, write_indexed_dataset
    from megatron_averis.data.progress import Progress
    from megatron_averis.data.tokenizer_training import (train_sentencepiece_from_texts,
                                                         write_megatron_metadata)

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    check_fraction(natural_fraction)
    packages = read_packages(natural_packages)
    roots = default_roots() if use_default_roots else []
    for i, extra in enumerate(extra_roots):
        if not os.path.isdir(extra):
            raise FileNotFoundError(f"--extra-root {extra}: not a directory")
        roots.append((f"extra-{i + 1}-{os.path.basename(os.path.normpath(extra))}", extra))
    t_start = time.monotonic()
    docs, scan = scan_sources(roots, include_embedded=include_embedded, progress=show_progress,
                              natural_packages=packages)
    train_docs = [d for d in docs if d.split == "train"]
    valid_docs = [d for d in docs if d.split == "valid"]
    if not valid_docs or not train_docs:
        raise ValueError(f"only {len(docs)} documents: too few for a train split and a "
                         f"1-in-{VALID_MODULUS} validation split; add sources with --extra-root")
    for split, group in (("train", train_docs), ("valid", valid_docs)):
        if natural_fraction is not None and not any(d.kind == "natural" for d in group):
            raise ValueError(f"--natural-fraction: the {split} split has no natural-language "
                             "document to measure the share against; add prose "
                             "(--natural-text-package) or drop the option")

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = temp_path(out_dir)
    os.makedirs(tmp)
    try:
        model = os.path.join(tmp, "tokenizer.model")
        t0 = time.monotonic()
        if tokenizer_model:
            shutil.copyfile(tokenizer_model, model)
            write_megatron_metadata(model)
            tok_info = {"source": "given", "sha256": file_sha256(model)}
        else:
            if show_progress:
                print(f"tokenizer: training BPE {vocab_size} on a "
                      f"{tokenizer_sample_bytes / 2**20:.0f} MiB sample, each source in "
                      "proportion", file=sys.stderr)
            sample = tokenizer_sample(train_docs, tokenizer_sample_bytes, natural_fraction)
            train_sentencepiece_from_texts((d.text for d in sample), model,
                                           vocab_size=vocab_size, model_type="bpe",
                                           max_bytes=tokenizer_sample_bytes,
                                           source_name="the corpus sample")
            tok_info = {"source": "trained", "model_type": "bpe",
                        "sample_bytes": tokenizer_sample_bytes, "sha256": file_sha256(model),
                        "sample_natural_bytes": sum(d.nbytes for d in sample
                                                    if d.kind == "natural"),
                        "sample_code_bytes": sum(d.nbytes for d in sample if d.kind == "code")}
        tok_info.update(vocab_size=_vocab_size(model), seconds=round(time.monotonic() - t0, 2))
        spec = TokenizerSpec(model, "sentencepiece")

        def count_tokens(group):
            return iter_token_counts((d.text for d in group), spec, workers)

        splits, used, selection = {}, {}, {}
        for split, group, cap in (("train", train_docs, max_tokens),
                                  ("valid", valid_docs, None)):
            if natural_fraction is not None:
                group, selection[split] = select_natural_fraction(group, natural_fraction,
                                                                  count_tokens)
            if split == "valid" and max_tokens is not None:
                # A capped build keeps the validation documents of the same key range.
                last = used["train"][-1][0].key
                group = [d for d in group if d.key <= last] or group[:1]
            jobs = (Job(d.label, 1, d.text, "str") for d in group)
            total = sum(len(d.text.encode("utf-8")) for d in group)
            progress = Progress(f"encode {split}", total, show_progress)
            stats = write_indexed_dataset(jobs, os.path.join(tmp, split), spec, workers=workers,
                                          max_tokens=cap, progress=progress)
            used[split] = group[:stats.documents + stats.empty_documents]
            tokens = _sequence_lengths(os.path.join(tmp, split), stats)
            mix = mix_table(used[split], tokens)
            splits[split] = {**stats.as_dict(), "text_sha256": _text_sha256(used[split]),
                             "natural_language_bytes": mix["by_kind"]["natural"]["bytes"],
                             "code_bytes": mix["by_kind"]["code"]["bytes"], "mix": mix,
                             **({"selection": selection[split]} if split in selection else {})}
            used[split] = list(zip(used[split], tokens))
        manifest = _manifest(scan, tok_info, splits, used, vocab_size, tokenizer_sample_bytes,
                             max_tokens, min_tokens, roots, time.monotonic() - t_start,
                             natural_fraction, [p.file for p in packages])
        _write_documents_tsv(os.path.join(tmp, "documents.tsv"), used)
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _vocab_size(model: str) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=model).get_piece_size()


def _sequence_lengths(prefix: str, stats) -> List[int]:
    """Tokens of each written document, read back from the .idx."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if stats.empty_documents:
        raise RuntimeError(f"{stats.empty_documents} documents encoded to no token; the scan "
                           "rules should have skipped them")
    ds = IndexedDataset(prefix)  # its arrays live as long as the object: copy them out
    lengths = ds.sequence_lengths.tolist()
    del ds
    return lengths


def _manifest(scan, tok_info, splits, used, vocab_size, sample_bytes, max_tokens, min_tokens,
              roots, seconds, natural_fraction, package_files) -> dict:
    corpus = hashlib.sha256("".join(splits[s][k] for s in ("train", "valid")
                                    for k in ("bin_sha256", "idx_sha256")).encode()).hexdigest()
    text = hashlib.sha256((splits["train"]["text_sha256"] +
                           splits["valid"]["text_sha256"]).encode()).hexdigest()
    train_tokens = splits["train"]["tokens"]
    return {
        "corpus": "experiment",
        "builder_version": BUILDER_VERSION,
        "python": platform.python_version(),
        "tool_versions": _tool_versions(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "settings": {"extensions": list(EXTENSIONS), "max_file_bytes": MAX_FILE_BYTES,
                     "max_line_chars": MAX_LINE_CHARS, "valid_modulus": VALID_MODULUS,
                     "vocab_size": vocab_size, "tokenizer_sample_bytes": sample_bytes,
                     "max_tokens": max_tokens, "roots": [label for label, _ in roots],
                     "natural_fraction": natural_fraction,
                     "natural_text_packages": package_files},
        "scan": scan,
        "tokenizer": tok_info,
        "splits": splits,
        "total_tokens": train_tokens + splits["valid"]["tokens"],
        "meets_min_tokens": train_tokens >= min_tokens,
        "min_tokens": min_tokens,
        "text_sha256": text,
        "corpus_sha256": corpus,
        "build_seconds": round(seconds, 1),
    }


def _tool_versions() -> dict:
    """Versions of the packages whose behaviour shapes the output bytes."""
    from importlib import metadata

    out = {}
    for name in ("sentencepiece", "megatron-core", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _write_documents_tsv(path: str, used: Dict[str, List[Tuple[SourceDoc, int]]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("split\tlabel\tkind\tbytes\tsha256\tsource\ttokens\n")
        for split in ("train", "valid"):
            for d, tokens in used[split]:
                f.write(f"{split}\t{d.label}\t{d.kind}\t{d.nbytes}\t{d.sha256}\t{d.source}"
                        f"\t{tokens}\n")


def _replace_dir(new: str, target: str) -> None:
    old = None
    if os.path.exists(target):
        old = temp_path(target)
        os.rename(target, old)
    os.rename(new, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def summary(m: dict) -> str:
    tr, va = m["splits"]["train"], m["splits"]["valid"]
    lines = [
        f"experiment corpus (python {m['python']}, {len(m['scan']['distributions'])} "
        f"distributions, {m['scan']['documents']} documents scanned in)",
        f"  train: {tr['documents']} docs, {tr['tokens']:,} tokens, "
        f"{tr['text_bytes']:,} bytes, {tr['bytes_per_token']:.3f} bytes/token",
        f"  valid: {va['documents']} docs, {va['tokens']:,} tokens, "
        f"{va['bytes_per_token']:.3f} bytes/token",
        f"  natural-language bytes (train): {tr['natural_language_bytes']:,}; "
        f"code bytes: {tr['code_bytes']:,}",
        *format_mix("train", tr["mix"], m["settings"]["natural_fraction"]),
        *format_mix("valid", va["mix"], m["settings"]["natural_fraction"]),
        f"  tokenizer: vocab {m['tokenizer']['vocab_size']}, sha256 {m['tokenizer']['sha256']}",
        f"  text_sha256:   {m['text_sha256']}",
        f"  corpus_sha256: {m['corpus_sha256']}",
        f"  built in {m['build_seconds']} s",
    ]
    target = m["settings"]["natural_fraction"]
    if target is not None and tr["mix"]["natural_token_share"] > target + 0.02:
        lines.append(f"NOTE: natural share {tr['mix']['natural_token_share']:.1%} is above the "
                     f"target {target:.1%}: all code is kept and prose is never dropped")
    if not m["meets_min_tokens"] and m["settings"]["max_tokens"] is None:
        lines.append(f"WARNING: the train split has fewer than {m['min_tokens']:,} tokens; add "
                     "sources with --extra-root (e.g. /usr/include, /usr/share/doc)")
    return "\n".join(lines)
