"""tools/compare_runs.py on real trainer outputs, and its pieces against direct computations."""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from megatron_averis.diagnostics import compare
from megatron_averis.diagnostics.runs import Curve, load_run, load_runs, read_metrics_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _jsonl_losses(run_dir, event):
    """(steps, losses) straight from the file (these runs were never resumed)."""
    recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    pts = [(r["step"], r["loss"]) for r in recs if r["event"] == event]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


def test_compare_runs_on_trainer_outputs(tiny_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "cmp")
    rc = compare.main([tiny_runs["averis"], tiny_runs["bf16"], "--out", out, "--last-percent", "50"])
    assert rc == 0
    from matplotlib.image import imread

    img = imread(out + ".png")
    assert img.shape[0] > 300 and img.shape[1] > 1000 and img.std() > 0.05  # drawn, not blank
    table = open(out + ".md", encoding="utf-8").read()
    assert "`tiny-bf16`" in table  # the bf16 run is the default baseline
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| tiny-")}
    assert set(rows) == {"tiny-bf16", "tiny-averis"}
    assert "+0.00%" in rows["tiny-bf16"]

    # The gap, from the files: steps in the last 50% of 4 steps are 2..4 (both runs log every step).
    s_a, l_a = _jsonl_losses(tiny_runs["averis"], "train")
    s_b, l_b = _jsonl_losses(tiny_runs["bf16"], "train")
    assert list(s_a) == list(s_b) == [1, 2, 3, 4]
    want = np.mean((l_a[1:] - l_b[1:]) / l_b[1:])
    assert f"{100 * want:+.2f}%" in rows["tiny-averis"]
    (vs, v_a), (_, v_b) = _jsonl_losses(tiny_runs["averis"], "valid"), _jsonl_losses(tiny_runs["bf16"], "valid")
    assert list(vs) == [2, 4]  # both in the window
    assert f"{100 * np.mean((v_a - v_b) / v_b):+.2f}%" in rows["tiny-averis"]


def test_command_line_and_tensorboard_source(tiny_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "tb")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compare_runs.py"),
                        f"A={tiny_runs['averis']}", f"B={tiny_runs['bf16']}", "--source", "tb",
                        "--baseline", "B", "--out", out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(out + ".png") > 10_000 and "| A | averis |" in r.stdout
    tb = load_run(tiny_runs["averis"], source="tb")
    js = load_run(tiny_runs["averis"], source="jsonl")
    for split in ("train", "valid"):
        assert list(tb.curve(split).steps) == list(js.curve(split).steps)
        np.testing.assert_allclose(tb.curve(split).values, js.curve(split).values, rtol=1e-6)
    assert tb.info["recipe"] == "averis"  # from config.json beside tensorboard/


def test_resumed_run_keeps_the_continued_timeline(tmp_path):
    recs = [{"event": "start", "step": 0, "config": {"run_name": "r", "recipe": {"name": "nvfp4"}}}]
    recs += [{"event": "train", "step": s, "loss": 10.0 - s} for s in range(1, 7)]
    recs += [{"event": "valid", "step": 6, "loss": 4.5}]
    recs += [{"event": "start", "step": 4, "config": {"run_name": "r"}}]  # resumed from step 4
    recs += [{"event": "train", "step": s, "loss": 20.0 + s} for s in range(5, 8)]
    recs += [{"event": "train", "step": 8, "loss": None}]  # a NaN loss
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"event": "tra')  # cut off
    curves, config = read_metrics_jsonl(str(path))
    assert list(curves["train"].steps) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert list(curves["train"].values[:7]) == [9, 8, 7, 6, 25, 26, 27]
    assert math.isnan(curves["train"].values[7])
    assert "valid" not in curves  # its only point (step 6) belonged to the abandoned timeline
    assert config == {"run_name": "r"}
    path.write_text('{"event": "train", "step": 1, "loss": 1}\nnot json\n{"event": "end"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics_jsonl(str(path))


def test_tensorboard_restart_purges_orphaned_steps(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from megatron_averis.diagnostics.runs import read_tensorboard

    w = SummaryWriter(str(tmp_path))
    for s in range(1, 7):
        w.add_scalar("train/loss", 10.0 - s, s)
    w.close()
    w = SummaryWriter(str(tmp_path))  # a resumed process: a second events file
    for s in range(5, 8):
        w.add_scalar("train/loss", 20.0 + s, s)
    w.close()
    c = read_tensorboard(str(tmp_path))["train"]
    assert list(c.steps) == [1, 2, 3, 4, 5, 6, 7]
    assert list(c.values) == [9, 8, 7, 6, 25, 26, 27]


def test_ema_is_tensorboards_debiased_average():
    x = np.array([4.0, 2.0, math.nan, 3.0, 1.0])
    w = 0.6
    got = compare.ema(x, w)
    # by hand: s1 = .4·4 = 1.6 → 1.6/.4; s2 = .6·1.6 + .4·2 = 1.76 → 1.76/.64; NaN repeats;
    # s3 = .6·1.76 + .4·3 = 2.256 → /.784; s4 = .6·2.256 + .4·1 = 1.7536 → /.8704
    want = [4.0, 1.76 / 0.64, 1.76 / 0.64, 2.256 / 0.784, 1.7536 / 0.8704]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(compare.ema(x[[0, 1, 3]], 0.0), x[[0, 1, 3]])
    with pytest.raises(ValueError, match="smoothing"):
        compare.ema(x, 1.0)


def test_relative_gap_window_and_interpolation():
    run = Curve(np.arange(10, 101, 10), np.linspace(3.0, 2.1, 10))
    base = Curve(np.arange(0, 121, 20), np.linspace(3.2, 2.0, 7))  # coarser and longer
    gap, n, end = compare.relative_gap(run, base, 25)
    assert end == 100
    steps = [80, 90, 100]  # >= 100·(1 − 0.25)
    lb = np.interp(steps, base.steps, base.values)
    lr = run.values[-3:]
    assert n == 3 and gap == pytest.approx(np.mean((lr - lb) / lb), rel=1e-12)
    # A window with no logged step of the run uses its last step in the common range.
    sparse = Curve(np.array([50, 100]), np.array([2.5, 2.2]))
    short = Curve(np.array([0, 95]), np.array([3.0, 2.0]))
    gap, n, end = compare.relative_gap(sparse, short, 5)  # window [90.25, 95]: no run step
    lb = 3.0 - 50 / 95
    assert (n, end) == (1, 95) and gap == pytest.approx((2.5 - lb) / lb, rel=1e-12)
    with pytest.raises(ValueError, match="last-percent"):
        compare.relative_gap(run, base, 0)


def test_wandb_project(monkeypatch):
    """wandb's public API (Api().runs / run.scan_history) is read into the same curves; the API
    object here is a local stand-in for the online service."""
    class FakeRun:
        def __init__(self, name, rid, losses, recipe):
            self.name, self.path, self.config = name, ["ent", "proj", rid], {"recipe": {"name": recipe}}
            self._rows = [{"_step": s, "train/loss": v} for s, v in losses] + [
                {"_step": 4, "valid/loss": 1.5}]

        def scan_history(self, keys):
            return [r for r in self._rows if keys[1] in r]

    class FakeApi:
        def runs(self, path, filters=None):
            assert path == "ent/proj" and filters == {"group": "tiny"}
            return [FakeRun("bf16", "a1", [(2, 3.0), (4, 2.0)], "bf16"),
                    FakeRun("averis", "b2", [(2, 3.3), (4, 2.1)], "averis")]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=FakeApi))
    runs = load_runs(["wandb:ent/proj"], wandb_group="tiny")
    assert [r.label for r in runs] == ["bf16", "averis"] and runs[1].source == "wandb:ent/proj/b2"
    rows = compare.gap_rows(runs, "bf16", 50)
    assert rows[1]["train_gap"] == pytest.approx((0.3 / 3 + 0.1 / 2) / 2) and rows[1]["valid_gap"] == 0.0


def test_errors(tiny_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert compare.main([tiny_runs["bf16"], "--baseline", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "baseline 'nope' is not among the runs ['tiny-bf16']" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert compare.main([tiny_runs["bf16"], tiny_runs["bf16"], "--out", str(tmp_path / "x")]) == 2
    assert "name them with LABEL=PATH" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "neither metrics.jsonl nor TensorBoard" in capsys.readouterr().err


def test_wandb_missing(monkeypatch, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert compare.main(["wandb:e/p", "--out", str(tmp_path / "x")]) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_auto_smoothing_and_bad_value(tiny_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert compare.auto_smoothing(10) == 0.0 and compare.auto_smoothing(40) == 0.5
    assert compare.auto_smoothing(1000) == pytest.approx(0.98)
    assert compare.main([tiny_runs["bf16"], "--smoothing", "x", "--out", str(tmp_path / "x")]) == 2
    assert "--smoothing 'x'" in capsys.readouterr().err
    assert compare.main([tiny_runs["bf16"], "--smoothing", "1", "--out", str(tmp_path / "x")]) == 2
    assert "smoothing weight must be in [0, 1)" in capsys.readouterr().err


def test_matplotlib_missing_is_named(monkeypatch, tiny_runs, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert compare.main([tiny_runs["bf16"], "--out", str(tmp_path / "x")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_max_step_difference_and_per_step_table():
    import numpy as np

    from megatron_averis.diagnostics.compare import max_step_difference, per_step_table
    from megatron_averis.diagnostics.runs import Curve, Run

    base = Curve(np.array([1, 2, 3, 4]), np.array([4.0, 3.0, 2.0, 1.0]))
    run = Curve(np.array([2, 3, 4, 5]), np.array([3.03, 2.0, 1.005, 0.5]))  # step 5: not common
    diff, step = max_step_difference(run, base)
    assert step == 2 and diff == pytest.approx(0.01)
    table = per_step_table([Run("ref", "t", {"train": base}), Run("tp2", "t", {"train": run})], "ref")
    assert "| tp2 | 1.000% | 2 | 1.0000 / 1.0050 |" in table


def test_megatron_lm_tensorboard_run_compares_with_ours(tiny_runs, tmp_path):
    """A Megatron-LM run's --tensorboard-dir (scalars 'lm loss', 'lm loss validation', as its
    training loop writes them) loads like one of ours and lines up step by step."""
    from torch.utils.tensorboard import SummaryWriter

    ours = load_run(tiny_runs["bf16"])
    w = SummaryWriter(str(tmp_path / "megatron-lm"))
    for s, v in zip(ours.curve("train").steps, ours.curve("train").values):
        w.add_scalar("lm loss", v * 1.01, int(s))
        w.add_scalar("learning-rate", 1e-3, int(s))
    for s, v in zip(ours.curve("valid").steps, ours.curve("valid").values):
        w.add_scalar("lm loss validation", v * 1.02, int(s))
    w.close()
    runs = load_runs([f"ours={tiny_runs['bf16']}", f"megatron-lm={tmp_path / 'megatron-lm'}"])
    rows = compare.gap_rows(runs, "ours", 100)
    assert rows[1]["train_gap"] == pytest.approx(0.01, rel=1e-4)
    assert rows[1]["valid_gap"] == pytest.approx(0.02, rel=1e-4)
