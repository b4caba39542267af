"""tools/gradient_fidelity.py on a real Averis run's checkpoints: its figures against gradients and
operands computed here, with the test's own forward/backward and hooks, in float64 NumPy and the
NumPy FP4 reference."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fp4_reference import nvfp4, rht
from megatron_averis.diagnostics import checkpoint as ckpt
from megatron_averis.diagnostics import fidelity_report as report
from megatron_averis.diagnostics import gradient_fidelity as gf
from megatron_averis.diagnostics.batch import batch_tokens
from megatron_averis.numerics.hadamard import random_signs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_PARAM = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LINEARS = {"self_attention.linear_qkv": "qkv", "self_attention.linear_proj": "proj",
            "mlp.linear_fc1": "fc1", "mlp.linear_fc2": "fc2"}


def _run(tmp_path, name, *args):
    out = str(tmp_path / name)
    assert gf.main([*args, "--out", out]) == 0
    with open(out + ".jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert not os.path.exists(out + ".jsonl.partial")
    return out, records


def _grad(records, **match):
    return [r for r in records if r["record"] == "gradient"
            and all(r[k] == v for k, v in match.items())]


def _own_model(info, recipe, fp32=False):
    """The checkpoint's model under `recipe`, loaded here (FP32: built with FP32 parameters and
    given the checkpoint's weights)."""
    from megatron_averis.training.cpu_compat import cpu_training

    model = ckpt.load_model(info, recipe=recipe)
    if fp32:
        with cpu_training():
            fp = ckpt.build_model(info.config, recipe=recipe, bf16=False)
        fp.load_state_dict(model.state_dict())
        model = fp
    return model.train()


def _bf16(a):
    return torch.tensor(a, dtype=torch.float32).bfloat16().double().numpy()


def _forward_backward(model, tokens):
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    model(ids, pos, None, labels=labels).float().mean().backward()
    return {n: p.grad.double().numpy().ravel() for n, p in model.named_parameters()}


def _numpy_figures(g, r):
    """(rel. error, cosine) of g against r, float64, over: the whole model, the transformer layers,
    each layer, each layer's linear weights."""
    scopes = {("total", None, None): list(r)}
    for n in r:
        m = _PARAM.match(n)
        if m:
            layer = int(m.group(1))
            scopes.setdefault(("layers", None, None), []).append(n)
            scopes.setdefault(("layer", layer, None), []).append(n)
            if m.group(2) in _LINEARS and m.group(3) == "weight":
                scopes.setdefault(("linear", layer, _LINEARS[m.group(2)]), []).append(n)
    out = {}
    for key, names in scopes.items():
        a = np.concatenate([g[n] for n in names])
        b = np.concatenate([r[n] for n in names])
        out[key] = (np.linalg.norm(a - b) / np.linalg.norm(b),
                    a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return out


def _check_against_numpy(records, iteration, recipe, g, r):
    want = _numpy_figures(g, r)
    got = {(x["scope"], x["layer"], x["linear"]): x
           for x in _grad(records, iteration=iteration, recipe=recipe)
           if x["scope"] in ("total", "layers", "layer", "linear")}
    assert set(got) == set(want)
    assert len([k for k in want if k[0] == "linear"]) == 8  # 2 layers x qkv, proj, fc1, fc2
    for key, (rel, cos) in want.items():
        assert got[key]["rel_error"] == pytest.approx(rel, rel=1e-9), key
        assert got[key]["cosine"] == pytest.approx(cos, rel=1e-12), key
    return want


def test_trajectory_against_float64_gradients(tiny_runs, tiny_corpus, tmp_path):
    """Two checkpoints, an SR recipe (averis) and an RNE one (nvfp4-plain) against the BF16
    recipe: every total / layer / linear figure equals NumPy's on gradients computed here; the
    BF16 recipe against itself is exact."""
    run = tiny_runs["averis"]
    out, records = _run(tmp_path, "traj", "--load", run, "--steps", "2", "4",
                        "--recipes", "bf16", "averis", "nvfp4-plain", "--operand-recipes")
    setup = records[0]
    assert setup["record"] == "setup" and setup["iterations"] == [2, 4]
    assert (setup["batch_size"], setup["seq_length"], setup["seed"]) == (2, 32, 0)
    assert all(r["iteration"] in (2, 4) for r in records[1:])
    assert not [r for r in records if r["record"] == "operand"]

    tokens = batch_tokens(tiny_corpus["valid"], 2, 32, seed=0)
    with ckpt.single_process():
        for it in (2, 4):
            info = ckpt.find(run, it)
            ref = _forward_backward(_own_model(info, "bf16"), tokens)
            for recipe in ("averis", "nvfp4-plain"):
                g = _forward_backward(_own_model(info, recipe), tokens)
                fig = _check_against_numpy(records, it, recipe, g, ref)
                assert 0.05 < fig[("total", None, None)][0] < 1  # FP4 noise, not a zero
    for r in _grad(records, recipe="bf16"):
        assert r["rel_error"] == 0 and r["cosine"] == pytest.approx(1, abs=1e-12), r
    # Every parameter tensor is in the total, and in exactly one layer or "other" record.
    for it in (2, 4):
        rs = _grad(records, iteration=it, recipe="averis")
        total = next(r for r in rs if r["scope"] == "total")
        parts = [r for r in rs if r["scope"] in ("layer", "other")]
        assert sum(r["numel"] for r in parts) == total["numel"]
        assert total["ref_norm"] == pytest.approx(
            np.sqrt(sum(r["ref_norm"] ** 2 for r in parts)), rel=1e-12)
    md = open(out + ".md", encoding="utf-8").read()
    assert "| 4 | averis |" in md and "| 2 | bf16 | " in md
    csv_lines = open(out + "_gradients.csv", encoding="utf-8").read().splitlines()
    assert csv_lines[0] == ",".join(report.GRADIENT_FIELDS)
    assert len(csv_lines) == 1 + len(_grad(records))


def test_fp32_reference_and_operand_statistics(tiny_runs, tiny_corpus, tmp_path):
    """--reference fp32: the BF16 recipe's figures against an FP32 gradient computed here; the
    operand statistics of layer 1's fc2 (input and output gradient, captured here by hooks)
    against float64 NumPy and the NumPy NVFP4 reference in both block orientations."""
    pytest.importorskip("matplotlib")
    run = tiny_runs["averis"]
    out, records = _run(tmp_path, "fp32", "--load", run, "--reference", "fp32",
                        "--recipes", "bf16", "--seed", "7", "--plot")
    for suffix in ("_layers.png", "_operands.csv", ".md"):
        assert os.path.getsize(out + suffix) > 0
    assert not os.path.exists(out + "_steps.png")  # one checkpoint: no course over steps

    tokens = batch_tokens(tiny_corpus["valid"], 2, 32, seed=7)
    seen = {}
    with ckpt.single_process():
        info = ckpt.find(run)
        ref = _forward_backward(_own_model(info, "bf16", fp32=True), tokens)
        model = _own_model(info, "bf16")
        fc2 = model.decoder.layers[1].mlp.linear_fc2
        fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("input", a[0].detach()))

        def on_output(module, args, output):
            output[0].register_hook(lambda g: seen.__setitem__("grad", g.detach()))

        fc2.register_forward_hook(on_output)
        g = _forward_backward(model, tokens)
    fig = _check_against_numpy(records, 4, "bf16", g, ref)
    assert 1e-4 < fig[("total", None, None)][0] < 0.05  # BF16 against FP32: small, not zero

    signs = random_signs(0).numpy()
    for operand in ("input", "grad"):
        row = next(r for r in records if r["record"] == "operand" and r["layer"] == 1
                   and r["linear"] == "fc2" and r["operand"] == operand)
        x = seen[operand].reshape(-1, seen[operand].shape[-1]).double().numpy()
        assert (row["tokens"], row["features"]) == x.shape
        mu = x.mean(0)
        mu_hat = _bf16(mu)
        res = x - mu
        assert row["mean_to_residual"] == pytest.approx(
            np.sqrt(len(x)) * np.linalg.norm(mu) / np.linalg.norm(res), rel=1e-9)
        for along, a, m in (("features", x, mu_hat[None, :]), ("tokens", x.T, mu_hat[:, None])):
            norm = np.linalg.norm(a)
            plain = np.linalg.norm(nvfp4(a)[0] - a) / norm
            split = np.linalg.norm(nvfp4(a - m)[0] + m - a) / norm
            assert row[f"qerr_nvfp4_{along}"] == pytest.approx(plain, rel=1e-6), (operand, along)
            assert row[f"qerr_nvfp4_split_{along}"] == pytest.approx(split, rel=1e-6), (operand, along)
            if along == "features":  # rotate, then split off the rotated operand's mean
                xr = rht(a, signs)
                rot = xr - _bf16(xr.mean(0))[None, :]
            else:  # the mean is over the rotation's axis: split, then rotate the residual
                rot = rht(a - m, signs)
            split_rht = np.linalg.norm(nvfp4(rot)[0] - rot) / norm
            assert row[f"qerr_nvfp4_split_rht_{along}"] == pytest.approx(split_rht, rel=2e-3)
        assert row["qerr_nvfp4_features"] != row["qerr_nvfp4_tokens"]


def test_recipe_override(tiny_runs, tiny_corpus, tmp_path):
    """--recipe-override reaches the FP4 recipes (another stochastic-rounding draw here)."""
    from megatron_averis.recipes import get_recipe

    run = tiny_runs["averis"]
    _, records = _run(tmp_path, "sr", "--load", run, "--recipes", "bf16", "averis",
                      "--recipe-override", "sr_seed=7", "--operand-recipes")
    assert records[0]["recipe_overrides"] == ["sr_seed=7"]
    tokens = batch_tokens(tiny_corpus["valid"], 2, 32, seed=0)
    with ckpt.single_process():
        info = ckpt.find(run)
        ref = _forward_backward(_own_model(info, "bf16"), tokens)
        g = _forward_backward(_own_model(info, get_recipe("averis", ["sr_seed=7"])), tokens)
        default = _forward_backward(_own_model(info, "averis"), tokens)
    fig = _check_against_numpy(records, 4, "averis", g, ref)
    assert fig[("total", None, None)][0] != pytest.approx(
        _numpy_figures(default, ref)[("total", None, None)][0], rel=1e-6)


def test_batch_windows(tiny_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(tiny_corpus["valid"])
    stream = np.concatenate([np.asarray(ds[i]) for i in range(len(ds))])
    first = batch_tokens(tiny_corpus["valid"], 3, 20)
    np.testing.assert_array_equal(first.numpy().ravel(), stream[:63])
    a = batch_tokens(tiny_corpus["valid"], 3, 20, seed=5)
    np.testing.assert_array_equal(a.numpy(), batch_tokens(tiny_corpus["valid"], 3, 20, seed=5).numpy())
    assert not np.array_equal(a.numpy(), batch_tokens(tiny_corpus["valid"], 3, 20, seed=6).numpy())
    starts = set()
    for row in a.numpy():  # each row is one window of the stream, at a multiple of 21
        hits = [s for s in range(0, len(stream) - 20, 21) if np.array_equal(stream[s:s + 21], row)]
        assert hits
        starts.add(hits[0])
    assert len(starts) == 3
    with pytest.raises(ValueError, match="fewer than --batch-size"):
        batch_tokens(tiny_corpus["valid"], 2, len(stream) // 2, seed=0)


@pytest.mark.parametrize("args, message", [
    (["--recipes", "bf16", "nvfp5"], "unknown recipe 'nvfp5'"),
    (["--recipe-override", "sr_sed=7"], "unknown recipe override key 'sr_sed'"),
    (["--steps", "3"], "no complete checkpoint of iteration 3; it holds iterations 2, 4"),
    (["--steps", "two"], "--steps takes iteration numbers or 'all'"),
    (["--recipes", "bf16", "--operand-recipes", "averis"], "not among --recipes"),
    (["--batch-size", "1", "--seq-length", "24"], "not a multiple of 16"),
    (["--data-prefix", "/nonexistent/valid"], "no indexed dataset"),
])
def test_bad_inputs_fail_before_work(tiny_runs, tmp_path, capsys, args, message):
    out = tmp_path / "x"
    assert gf.main(["--load", tiny_runs["averis"], *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("cuda_visible, device, message", [
    (True, "cpu", "CUDA_VISIBLE_DEVICES="), (False, "cuda", "pass --device cpu")])
def test_device_the_process_cannot_serve(tiny_runs, tmp_path, capsys, monkeypatch, cuda_visible,
                                         device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_visible)
    out = tmp_path / "x"
    assert gf.main(["--load", tiny_runs["averis"], "--device", device, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_checkpoint(tmp_path, capsys):
    assert gf.main(["--load", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert gf.main(["--load", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_command_line_redraws_from_jsonl(tiny_runs, tmp_path):
    """The script runs as a program; --from-jsonl rewrites the tables from its JSONL alone."""
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "cli")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gradient_fidelity.py"),
                        "--load", tiny_runs["averis"], "--steps", "all", "--recipes", "bf16",
                        "nvfp4", "--operand-recipes", "nvfp4", "--out", out],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "iteration 4: nvfp4 (2/2)" in r.stdout
    again = str(tmp_path / "again")
    assert gf.main(["--from-jsonl", out + ".jsonl", "--plot", "--out", again]) == 0
    for suffix in (".md", "_gradients.csv", "_operands.csv"):
        assert open(out + suffix).read() == open(again + suffix).read(), suffix
    assert os.path.getsize(again + "_steps.png") > 0


@pytest.mark.gpu
def test_on_cuda(tiny_runs, tmp_path):
    """The tool on the GPU: BF16 parameters on CUDA; the FP4 recipes' errors in the range the CPU
    run gives, the BF16 recipe against itself (near) exact."""
    _, cuda = _run(tmp_path, "cuda", "--load", tiny_runs["averis"], "--device", "cuda",
                   "--recipes", "bf16", "nvfp4", "averis")
    # The CPU figures from a process that sees no GPU (resolve_device refuses a CPU model in a
    # process with CUDA: megatron-core's RoPE would move its tables to the GPU).
    out = str(tmp_path / "cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gradient_fidelity.py"), "--load",
                    tiny_runs["averis"], "--device", "cpu", "--recipes", "bf16", "nvfp4", "averis",
                    "--out", out], capture_output=True, text=True,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out + ".jsonl", encoding="utf-8") as f:
        cpu = [json.loads(line) for line in f]
    assert cuda[0]["device"] == "cuda" and cuda[0]["dtype"] == "bf16"
    assert _grad(cuda, recipe="bf16", scope="total")[0]["rel_error"] < 1e-2
    for name in ("nvfp4", "averis"):
        on_gpu = _grad(cuda, recipe=name, scope="total")[0]["rel_error"]
        on_cpu = _grad(cpu, recipe=name, scope="total")[0]["rel_error"]
        assert 0.5 * on_cpu < on_gpu < 2 * on_cpu
    ops = [r for r in cuda if r["record"] == "operand"]
    assert len(ops) == 3 * 2 * 4 * 2  # recipes x layers x linears x (input, grad)
    assert all(np.isfinite(r[k]) for r in ops for k in report.OPERAND_STATS)
