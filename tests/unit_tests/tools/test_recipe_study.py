"""Recipe studies over seeds: Student's t against closed forms, the summary against numpy, and
the launcher running real (tiny, CPU) training jobs, resuming nothing twice."""

import json
import math
import os
import sys

import numpy as np
import pytest

from megatron_averis.diagnostics.runs import Curve, Run, load_run
from megatron_averis.diagnostics.seeds import (band_over_seeds, betainc, by_recipe_and_seed, paired,
                                               same_seed_gap, summary_markdown, t_two_sided_p)


def test_same_seed_gap_and_band_against_loops():
    base = Curve(np.array([1, 3, 5]), np.array([4.0, 3.0, 2.0]))
    run = Curve(np.array([0, 1, 2, 3, 6]), np.array([9.0, 4.4, 3.3, 3.3, 1.0]))
    gap = same_seed_gap(run, base)  # step 0 and 6 lie outside the baseline's range
    assert gap.steps.tolist() == [1, 2, 3]
    assert gap.values == pytest.approx([0.4 / 4.0, 3.3 / 3.5 - 1, 0.3 / 3.0], rel=1e-12)
    a = Curve(np.array([1, 2, 3, 4]), np.array([1.0, 2.0, 3.0, 4.0]))
    b = Curve(np.array([2, 4, 6]), np.array([6.0, 0.0, 9.0]))
    steps, mean, lo, hi = band_over_seeds([a, b])
    assert steps.tolist() == [2, 4]
    assert mean.tolist() == [4.0, 2.0] and lo.tolist() == [2.0, 0.0] and hi.tolist() == [6.0, 4.0]


@pytest.mark.parametrize("t", [0.1, 0.8, 2.0, 5.0, 40.0])
def test_t_p_value_against_closed_forms(t):
    # df = 1 is Cauchy; df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
    assert t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)


@pytest.mark.parametrize("df,t_crit", [(4, 2.7764451), (10, 2.2281389), (2, 4.3026527)])
def test_t_p_value_at_tabulated_critical_values(df, t_crit):
    assert t_two_sided_p(t_crit, df) == pytest.approx(0.05, abs=1e-6)


@pytest.mark.parametrize("a,b,x", [(0.5, 0.5, 0.3), (2.0, 3.0, 0.7), (5.0, 0.5, 0.9)])
def test_betainc_against_numerical_integration(a, b, x):
    # substitute u^(1/a) to remove the endpoint singularity; Simpson on a fine grid
    u = np.linspace(0, x ** a, 200_001)
    f = (1 - u ** (1 / a)) ** (b - 1) / a
    h = u[1] - u[0]
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    beta = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    assert betainc(a, b, x) == pytest.approx(integral / beta, rel=1e-6)


def _run(recipe, seed, train, valid):
    steps = np.arange(1, len(train) + 1)
    return Run(f"{recipe}-{seed}", "test", {"train": Curve(steps, np.array(train, float)),
                                            "valid": Curve(steps[-1:], np.array([valid], float))},
               {"recipe": recipe, "seed": seed})


def test_paired_comparison_and_summary_against_numpy():
    rng = np.random.default_rng(0)
    runs, lv = [], {}
    for seed in (1, 2, 3, 4):
        for recipe, shift in (("bf16", 0.0), ("averis", 0.05), ("nvfp4-nohadamard", 0.08)):
            train = 3 + shift + rng.normal(0, 0.01, 20)
            lv[(recipe, seed)] = 2.9 + shift + rng.normal(0, 0.02)
            runs.append(_run(recipe, seed, train, lv[(recipe, seed)]))
    table = by_recipe_and_seed(runs, "valid", 10)
    pr = paired(table, "averis", "nvfp4-nohadamard", "valid")
    d = np.array([(lv[("averis", s)] - lv[("nvfp4-nohadamard", s)]) / lv[("nvfp4-nohadamard", s)]
                  for s in (1, 2, 3, 4)])
    t = d.mean() / (d.std(ddof=1) / 2)
    assert (pr.n, pr.a_better) == (4, int((d < 0).sum()))
    assert pr.mean == pytest.approx(d.mean()) and pr.t == pytest.approx(t)
    assert pr.p == pytest.approx(t_two_sided_p(t, 3))
    # the train loss is the mean of the last 10% of 20 steps: steps 18-20
    train = by_recipe_and_seed(runs, "train", 10)
    assert train["averis"][2] == pytest.approx(runs[4].curve("train").values[17:].mean())
    text = summary_markdown(runs, "bf16", [("averis", "nvfp4-nohadamard")], 10)
    gaps = 100 * np.array([(lv[("averis", s)] - lv[("bf16", s)]) / lv[("bf16", s)] for s in (1, 2, 3, 4)])
    row = next(ln for ln in text.splitlines() if ln.startswith("| averis | 4 |"))
    assert f"{gaps.mean():+.2f} ± {gaps.std(ddof=1):.2f}" in row
    assert f"| averis vs nvfp4-nohadamard | valid | 4 | {100 * d.mean():+.3f} |" in text


def test_duplicate_seed_is_an_error():
    runs = [_run("bf16", 1, [3, 2], 2.0), _run("bf16", 1, [3, 2], 2.0)]
    with pytest.raises(ValueError, match="two runs of recipe 'bf16' with seed 1"):
        by_recipe_and_seed(runs, "train", 10)


@pytest.mark.slow
def test_launch_runs_every_job_then_skips_finished_ones(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
    from megatron_averis.data.embedded import prepare_embedded_corpus
    from megatron_averis.diagnostics import study

    corpus = prepare_embedded_corpus(str(tmp_path / "corpus"), vocab_size=1024)
    monkeypatch.setenv("DIST_OPT", "0")
    monkeypatch.setenv("TRAIN_ITERS", "3")
    monkeypatch.setenv("EVAL_ITERS", "1")
    monkeypatch.setenv("EVAL_INTERVAL", "3")
    monkeypatch.setenv("LOG_INTERVAL", "1")
    extra = ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--tokenizer-model", corpus["tokenizer_model"], "--train-data-path", corpus["train_prefix"],
             "--valid-data-path", corpus["valid_prefix"], "--num-workers", "0", "--wandb-mode", "disabled"]
    out = str(tmp_path / "study")
    jobs = study.plan("tiny", ["nvfp4-plain", "averis"], [1, 2], out)
    assert [j.name for j in jobs] == ["tiny-nvfp4-plain-s1", "tiny-averis-s1", "tiny-nvfp4-plain-s2",
                                      "tiny-averis-s2"]
    report = study.launch(jobs, [0], 2, extra, deadline_s=600, poll_s=0.5, out=lambda *_: None)
    assert sorted(report["finished"]) == sorted(j.name for j in jobs) and not report["failed"]
    for job in jobs:
        with open(os.path.join(job.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            start = json.loads(f.readline())
        assert start["config"]["seed"] == job.seed and start["config"]["recipe"]["name"] == job.recipe
    again = study.launch(study.plan("tiny", ["nvfp4-plain", "averis"], [1, 2], out), [0], 2, extra,
                         deadline_s=600, poll_s=0.5, out=lambda *_: None)
    assert again["skipped"] == 4 and not again["finished"]
    runs = [load_run(j.run_dir) for j in jobs]
    table = by_recipe_and_seed(runs, "valid", 10)
    assert set(table) == {"nvfp4-plain", "averis"} and set(table["averis"]) == {1, 2}
    assert study.main(["summarize", out, "--baseline", "nvfp4-plain", "--pairs", "averis:nvfp4-plain",
                       "--out", str(tmp_path / "summary")]) == 0
    assert os.path.getsize(tmp_path / "summary.png") > 0


def test_pick_model_takes_the_largest_median_input_ratio(tmp_path, capsys):
    from megatron_averis.diagnostics import study

    header = "step,module,layer,linear,operand,tokens,features,mean_to_residual\n"
    paths = {}
    for model, inputs in (("a", [0.1, 0.5, 0.2]), ("b", [0.3, 0.35, 0.9])):
        rows = [f"10,m{i},{i},fc1,input,8,16,9.9" for i in range(3)]  # an earlier step: ignored
        rows += [f"20,m{i},{i},fc1,input,8,16,{v}" for i, v in enumerate(inputs)]
        rows += [f"20,m{i},{i},fc1,grad,8,16,0.01" for i in range(3)]
        paths[model] = tmp_path / f"{model}.csv"
        paths[model].write_text(header + "\n".join(rows) + "\n")
    assert study.main(["pick-model"] + [f"{m}={p}" for m, p in paths.items()]
                      + ["--out", str(tmp_path / "pick.json")]) == 0
    assert capsys.readouterr().out.strip() == "b"  # medians 0.2 vs 0.35
    picked = json.loads((tmp_path / "pick.json").read_text())
    assert picked["models"]["a"]["input_median"] == pytest.approx(0.2)


def test_until_step_compares_runs_cut_short_at_a_common_step():
    full = _run("bf16", 1, list(np.linspace(5, 3, 20)), 2.5)
    short = Run("averis-1", "t", {"train": Curve(np.arange(1, 13), np.linspace(6, 4, 12)),
                                  "valid": Curve(np.array([10]), np.array([4.2]))},
                {"recipe": "averis", "seed": 1})
    table = by_recipe_and_seed([full, short], "train", 10, until=10)
    # the last 10% of steps 1-10 is the window [9, 10] (window_mean's closed interval)
    assert table["bf16"][1] == pytest.approx(np.linspace(5, 3, 20)[8:10].mean())
    assert table["averis"][1] == pytest.approx(np.linspace(6, 4, 12)[8:10].mean())
    assert math.isnan(by_recipe_and_seed([short], "train", 10, until=15)["averis"][1])
    valid = by_recipe_and_seed([full, short], "valid", 10, until=12)
    assert math.isnan(valid["bf16"][1]) and valid["averis"][1] == 4.2  # bf16 validated at 20 only


@pytest.mark.slow
def test_deadline_saves_a_checkpoint_that_the_next_launch_resumes(tmp_path, monkeypatch):
    """At the deadline the runs get SIGTERM and save (their data-loader workers must survive
    that long), and a second launch continues from the checkpoint."""
    from megatron_averis.data.embedded import prepare_embedded_corpus
    from megatron_averis.diagnostics import study
    from megatron_averis.training.checkpoint_dirs import find_latest_checkpoint

    corpus = prepare_embedded_corpus(str(tmp_path / "corpus"), vocab_size=1024)
    for key, value in (("DIST_OPT", "0"), ("TRAIN_ITERS", "100000"), ("EVAL_ITERS", "1"),
                       ("EVAL_INTERVAL", "100000"), ("LOG_INTERVAL", "1"), ("SAVE_INTERVAL", "100000")):
        monkeypatch.setenv(key, value)
    extra = ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--tokenizer-model", corpus["tokenizer_model"], "--train-data-path", corpus["train_prefix"],
             "--valid-data-path", corpus["valid_prefix"], "--num-workers", "1", "--wandb-mode", "disabled"]
    out = str(tmp_path / "study")
    job = study.plan("tiny", ["bf16"], [1], out)[0]
    report = study.launch([job], [0], 1, extra, deadline_s=25, poll_s=0.5, out=lambda *_: None)
    assert report["stopped"] == [job.name]
    found = find_latest_checkpoint(job.run_dir)
    assert found is not None and found[0] > 0, open(os.path.join(out, f"{job.name}.log")).read()[-3000:]
    monkeypatch.setenv("TRAIN_ITERS", str(found[0] + 2))
    again = study.launch(study.plan("tiny", ["bf16"], [1], out), [0], 1, extra, deadline_s=300,
                         poll_s=0.5, out=lambda *_: None)
    assert again["finished"] == [job.name], (again, open(os.path.join(out, f"{job.name}.log")).read()[-2500:])
    with open(os.path.join(job.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        starts = [r for r in map(json.loads, f) if r["event"] == "start"]
    assert starts[-1]["step"] == found[0]
