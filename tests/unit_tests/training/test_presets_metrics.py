"""Preset parameter counts against the published models, FLOPs, MFU and the progress line."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from megatron_averis.training import metrics, writers
from megatron_averis.training.config import LoggingConfig
from megatron_averis.training.presets import (PRESETS, matmul_flops_per_token, padded_vocab_size,
                                              parameter_counts, training_flops_per_iteration)


def test_qwen3_0_6b_matches_published_parameter_count():
    # Qwen3-0.6B: 0.6B total, 0.44B non-embedding, vocabulary 151,936, tied embeddings.
    c = parameter_counts(PRESETS["qwen3-0.6b"].arch, 151936)
    assert c["total"] == 596_049_920
    assert c["decoder"] == 440_467_456 and c["output_layer"] == 0


def test_llama_3_2_1b_matches_published_parameter_count():
    # Llama-3.2-1B: 1,235,814,400 parameters with its 128,256-token vocabulary.
    assert parameter_counts(PRESETS["llama-1b"].arch, 128256)["total"] == 1_235_814_400


def test_untied_output_layer_counts_once_more():
    arch = PRESETS["tiny"].arch
    untied = SimpleNamespace(**{**arch.as_dict(), "tie_embeddings": False})
    assert parameter_counts(untied, 1024)["total"] - parameter_counts(arch, 1024)["total"] == 1024 * 64


def test_vocab_padding():
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 4) == 152064
    assert padded_vocab_size(1000, 128, 2) == 1024


def test_flops_formula_by_hand():
    a = PRESETS["tiny"].arch  # h 64, 4 x 32 query, 2 x 32 kv, ffn 192, 2 layers
    per_layer = 64 * (128 + 128) + 128 * 64 + 3 * 64 * 192
    expected = 2 * (2 * per_layer + 1024 * 64) + 2 * 2 * 2 * 256 * 128
    assert matmul_flops_per_token(a, 1024, 256) == expected
    assert training_flops_per_iteration(a, 1024, 256, 8) == 3 * expected * 256 * 8
    # Dense part ~ 6 N per token: within 10% for Qwen3-0.6B at 4K context.
    q = PRESETS["qwen3-0.6b"].arch
    n = parameter_counts(q, 151936)["total"]
    assert 3 * matmul_flops_per_token(q, 151936, 4096) == pytest.approx(6 * n + 12 * 28 * 4096 * 2048, rel=0.01)


def test_interval_stats_and_progress_line():
    s = metrics.interval_stats(iterations=10, seconds=20.0, tokens_per_iteration=65536,
                               flops_per_iteration=4e15, world_size=4, peak=989.4)
    assert s["seconds_per_iteration"] == 2.0 and s["tokens_per_second"] == 32768
    assert s["tflops_per_gpu"] == pytest.approx(500.0) and s["mfu"] == pytest.approx(500 / 989.4)
    line = metrics.progress_line({"step": 30, "loss": 3.21, "lr": 3e-4, "grad_norm": 0.5, **s,
                                  "memory_gib": 40.25, "eta_seconds": 3725}, train_iters=200)
    assert line == ("step  30/200 | loss 3.2100 | lr 3.000e-04 | grad-norm 0.500 | 32,768 tok/s | "
                    "500.0 TFLOP/s/GPU | MFU 50.5% | mem 40.25 GiB | 2.000 s/it | ETA 1:02:05")
    # On CPUs a rank is a process, not a GPU.
    cpu = metrics.progress_line({"step": 30, "loss": 3.21, "lr": 3e-4, "grad_norm": 0.5, **s,
                                 "memory_gib": 1.0, "eta_seconds": 5}, train_iters=200, per="rank")
    assert "| 500.0 TFLOP/s/rank |" in cpu and "GPU" not in cpu


def test_peak_tflops():
    assert metrics.peak_tflops(torch.device("cpu"), None)[0] is None
    assert metrics.peak_tflops(torch.device("cpu"), 100.0) == (100.0, "100 TFLOP/s per device (--peak-tflops)")


def test_wandb_absent_message(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    mode, msg = writers.wandb_status(None)
    assert mode == "disabled" and "not installed" in msg and "pip install wandb" in msg


def _logger(tmp_path, mode):
    args = LoggingConfig(log_interval=1, peak_tflops=None, ignored_flags=(),
                         log_dir=str(tmp_path), tensorboard_dir=str(tmp_path / "tb"), wandb_mode=mode,
                         wandb_project="megatron-averis", wandb_group=None, wandb_exp_name=None,
                         wandb_save_dir=None, model_preset="tiny", run_name="tiny-averis",
                         wandb_entity=None)
    return writers.RunLogger(args, {"seed": 1}, enabled=True)


def test_jsonl_and_tensorboard(tmp_path):
    log = _logger(tmp_path, "disabled")
    log.record("train", 5, {"loss": 2.5, "grad_norm": float("nan")}, scalars={"train/loss": 2.5})
    log.record("valid", 5, {"loss": 2.7})
    log.close()
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["event"], r["step"], r["loss"]) for r in rows] == [("train", 5, 2.5), ("valid", 5, 2.7)]
    assert rows[0]["grad_norm"] is None and rows[0]["time"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(5, 2.5)]


def test_a_partial_last_line_is_dropped_on_reopen_and_by_readers(tmp_path):
    """A run killed mid-write leaves half a record; the next launch must not append to it, and
    readers (check_resume.py, compare_runs) skip it when it is the last line."""
    path = tmp_path / "metrics.jsonl"
    whole = json.dumps({"event": "train", "step": 1, "loss": 3.0}) + "\n"
    path.write_text(whole + '{"event": "train", "st')
    assert writers.read_records(str(path)) == [json.loads(whole)]
    f = writers.MetricsFile(str(path))
    f.write({"event": "train", "step": 2, "loss": 2.5})
    f.close()
    lines = path.read_text().splitlines()
    assert lines[0] == whole.strip() and json.loads(lines[1])["step"] == 2 and len(lines) == 2
    path.write_text(whole + "not json\n" + whole)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        writers.read_records(str(path))


def test_check_resume_reads_a_truncated_last_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_resume", os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples",
                                     "pretrain", "check_resume.py"))
    check_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_resume)
    rows = [json.dumps({"event": "train", "step": s, "loss": 3.0 / s, "grad_norm": 1.0, "lr": 1e-3})
            for s in (1, 2)]
    for name, tail in (("a", ""), ("b", '{"event": "tr')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(rows) + "\n" + tail)
    assert check_resume.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "identical" in capsys.readouterr().out
    assert check_resume.main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_wandb_offline_run(tmp_path, monkeypatch):
    """Runs where wandb is installed: offline mode needs no network and keeps the run id."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = _logger(tmp_path, "offline")
    assert log.wandb_run is not None and log.wandb_run.group == "tiny" and log.wandb_run.name == "tiny-averis"
    log.record("train", 1, {"loss": 3.0}, scalars={"train/loss": 3.0})
    run_id = log.wandb_run.id
    log.close()
    # Where the module's docstring tells users to `wandb sync` from.
    assert "wandb sync <log-dir>/wandb/wandb/offline-run-*" in writers.__doc__
    runs = [d for d in os.listdir(tmp_path / "wandb" / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith(run_id)
    data = [f for f in os.listdir(tmp_path / "wandb" / "wandb" / runs[0]) if f.endswith(".wandb")]
    assert data and os.path.getsize(tmp_path / "wandb" / "wandb" / runs[0] / data[0]) > 0


def test_wandb_run_ids_per_launch_and_megatron_lm_names(tmp_path, monkeypatch):
    """wandb.init gets the run id, entity and project; scalars go out under our and Megatron-LM's
    names. The wandb module here is a local stand-in recording the calls."""
    calls = {"init": [], "log": []}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            pass

    def init(**kw):
        calls["init"].append(kw)
        return FakeRun()

    import importlib.util
    import sys
    import types

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "wandb" else real(n, *a))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    args = LoggingConfig(log_interval=1, peak_tflops=None, ignored_flags=(),
                         log_dir=str(tmp_path), tensorboard_dir=str(tmp_path / "tb"),
                         wandb_mode="offline", wandb_project="p", wandb_group=None,
                         wandb_exp_name=None, wandb_save_dir=None, model_preset="tiny",
                         run_name="tiny averis/1", wandb_entity="team")
    ids = set()
    for _ in range(2):  # two launches into the same directory: two runs
        log = writers.RunLogger(args, {}, enabled=True)
        ids.add(log.wandb_id)
        log.close()
    assert len(ids) == 2 and all(re.fullmatch(r"tiny-averis-1-\d{14}[0-9a-f]{4}", i) for i in ids)
    resumed = writers.RunLogger(args, {}, enabled=True, wandb_id="tiny-averis-1-x")
    m = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tflops_per_gpu": 7.0,
         "seconds_per_iteration": 0.2, "consumed_samples": 16}
    resumed.record("train", 3, m, scalars={"train/loss": 2.5})
    resumed.record("valid", 3, {"loss": 2.7, "ppl": 14.9}, scalars={"valid/loss": 2.7})
    resumed.close()
    assert [c["id"] for c in calls["init"]][2] == "tiny-averis-1-x"
    assert {c["id"] for c in calls["init"]} == ids | {"tiny-averis-1-x"}
    assert all(c["entity"] == "team" and c["resume"] == "allow" for c in calls["init"])
    (_, train), (_, valid) = calls["log"]
    assert train == {"train/loss": 2.5, "lm loss": 2.5, "learning-rate": 1e-3, "grad-norm": 0.5,
                     "throughput": 7.0, "iteration-time": 0.2, "samples vs steps": 16}
    assert valid == {"valid/loss": 2.7, "lm loss validation": 2.7, "lm loss validation ppl": 14.9}
