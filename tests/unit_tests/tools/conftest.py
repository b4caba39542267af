"""Real trainer outputs for the tools' tests: a small tokenizer and corpus, and two short CPU runs
of the tiny preset (BF16 and Averis) made by `python -m megatron_averis.pretrain`, once per
session."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TRAIN_ITERS = 4


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A BPE tokenizer (vocab 1000) and train/valid indexed datasets from the embedded corpus."""
    from megatron_averis.data.embedded import load_documents
    from megatron_averis.data.indexed import preprocess_files
    from megatron_averis.data.tokenizer_training import train_sentencepiece_from_texts

    out = tmp_path_factory.mktemp("corpus")
    docs = sorted(load_documents(), key=lambda d: len(d.text))[:14]
    model = train_sentencepiece_from_texts([d.text for d in docs[:12]], str(out / "tok.model"),
                                           vocab_size=1000)
    prefixes = {}
    for split, part in (("train", docs[:12]), ("valid", docs[12:])):
        src = out / f"{split}.jsonl"
        src.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in part))
        preprocess_files([str(src)], str(out / split), model, show_progress=False)
        prefixes[split] = str(out / split)
    return {"tokenizer_model": model, **prefixes}


def pretrain(corpus: dict, out_dir: str, *recipe_flags: str, save_interval: int | None) -> str:
    """Run the trainer in a subprocess; returns its log (and save) directory."""
    save = ["--save", out_dir, "--save-interval", str(save_interval)] if save_interval else []
    cmd = [sys.executable, "-W", "ignore", "-m", "megatron_averis.pretrain",
           "--model-preset", "tiny", *recipe_flags,
           "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
           "--train-iters", str(TRAIN_ITERS), "--lr", "3e-3", "--lr-warmup-iters", "1",
           "--train-data-path", corpus["train"], "--valid-data-path", corpus["valid"],
           "--tokenizer-model", corpus["tokenizer_model"],
           "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1",
           "--log-dir", out_dir, *save, "--num-workers", "0", "--wandb-mode", "disabled"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out_dir


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_corpus):
    """{"bf16": run dir (metrics only), "averis": run dir (checkpoints at steps 2 and 4)}."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "bf16": pretrain(tiny_corpus, str(root / "tiny-bf16"), "--bf16", save_interval=None),
        "averis": pretrain(tiny_corpus, str(root / "tiny-averis"), "--fp4-recipe", "averis",
                           save_interval=2),
    }
