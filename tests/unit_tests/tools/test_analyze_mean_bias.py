"""tools/analyze_mean_bias.py on a real Averis run's checkpoints."""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_averis.diagnostics import analyze
from megatron_averis.diagnostics import checkpoint as ckpt
from megatron_averis.diagnostics.mean_bias import METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
LINEARS = {"qkv", "proj", "fc1", "fc2"}


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_all_checkpoints_with_gradients(tiny_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "mb")
    assert analyze.main(["--load", tiny_runs["averis"], "--all-checkpoints", "--grads",
                         "--out", out]) == 0
    rows = _read(out + ".csv")
    assert list(rows[0]) == list(analyze.COLUMNS)
    assert {r["step"] for r in rows} == {"2", "4"}
    for step in ("2", "4"):
        mine = [r for r in rows if r["step"] == step]
        # 2 layers x 4 linears + the output layer, each with its input and its output gradient.
        assert len(mine) == 18
        assert {(r["layer"], r["linear"]) for r in mine if r["layer"]} == {
            (str(i), lin) for i in (0, 1) for lin in LINEARS}
        assert {r["operand"] for r in mine} == {"input", "grad"}
        lm = [r for r in mine if r["linear"] == "lm_head"]
        assert [r["layer"] for r in lm] == ["", ""] and lm[0]["features"] == "64"
    for r in rows:
        assert r["tokens"] == "64"  # the run's micro-batch 2 x sequence 32
        assert all(math.isfinite(float(r[m])) for m in METRICS)
    for suffix in ("_heatmap.png", "_training.png"):
        from matplotlib.image import imread

        img = imread(out + suffix)
        assert img.shape[1] > 800 and img.std() > 0.05
    assert "| 4 | fc2 | grad |" in open(out + ".md", encoding="utf-8").read()


def test_statistics_are_those_of_the_layer_input(tiny_runs, tmp_path, tiny_corpus):
    """The CSV row of one layer equals the float64 formulas on that layer's input, captured here
    with a hook of our own on the same model and batch."""
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "one")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "analyze_mean_bias.py"),
                        "--load", tiny_runs["averis"], "--ckpt-step", "2", "--recipe", "bf16",
                        "--batch-size", "1", "--seq-length", "48", "--out", out],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = next(x for x in _read(out + ".csv") if x["module"] == "decoder.layers.1.mlp.linear_fc2")
    assert (row["step"], row["tokens"], row["features"]) == ("2", "48", "192")

    seen = {}
    with ckpt.single_process():
        info = ckpt.find(tiny_runs["averis"], 2)
        model = ckpt.load_model(info, recipe="bf16")
        fc2 = model.decoder.layers[1].mlp.linear_fc2
        h = fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
        tokens = analyze.batch_tokens(tiny_corpus["valid"], 1, 48)
        with torch.no_grad():
            model(tokens[:, :-1], torch.arange(48)[None], None)
        h.remove()
    x = seen["x"].reshape(-1, 192).double().numpy()
    mu = x.mean(0)
    res = x - mu
    ratio = np.linalg.norm(mu) / np.sqrt((res ** 2).sum(1).mean())
    assert float(row["mean_to_residual"]) == pytest.approx(ratio, rel=1e-9)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    assert float(row["cos_mean_top_sv"]) == pytest.approx(abs(mu @ vt[0]) / np.linalg.norm(mu),
                                                          rel=1e-6)


def test_batch_tokens_reads_the_dataset_in_order(tiny_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(tiny_corpus["valid"])
    stream = np.concatenate([np.asarray(ds[i]) for i in range(len(ds))])
    t = analyze.batch_tokens(tiny_corpus["valid"], 3, 20)
    assert t.shape == (3, 21)
    np.testing.assert_array_equal(t.numpy().ravel(), stream[:63])
    with pytest.raises(ValueError, match="fewer than --batch-size"):
        analyze.batch_tokens(tiny_corpus["valid"], 1, len(stream) + 5)


def test_errors(tiny_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert analyze.main(["--load", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert analyze.main(["--load", tiny_runs["averis"], "--ckpt-step", "3",
                         "--out", str(tmp_path / "x")]) == 2
    assert "no complete checkpoint of iteration 3" in capsys.readouterr().err
    assert analyze.main(["--load", tiny_runs["averis"], "--data-prefix", str(tmp_path / "none"),
                         "--out", str(tmp_path / "x")]) == 2
    assert "no indexed dataset" in capsys.readouterr().err
