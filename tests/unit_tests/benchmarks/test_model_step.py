"""benchmarks/model_step.py in its CPU smoke mode: the trainer's own build and step on the tiny
preset, two recipes, one warm-up and one timed step; and the issue's targets as it judges them."""

import importlib.util
import json
import math
import os

import pytest
import torch

from megatron_averis.training.presets import PRESETS, training_flops_per_iteration

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _model_step():
    # benchmarks/ is scripts, not a package: load the file itself.
    path = os.path.join(REPO_ROOT, "benchmarks", "model_step.py")
    spec = importlib.util.spec_from_file_location("model_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tiny(tmp_path, device: str, steps: int, warmup: int = 1, recipes=("bf16", "averis"),
              extra=()):
    """model_step's main on the tiny preset; (exit code, JSON records)."""
    out = tmp_path / "records.json"
    rc = _model_step().main([
        "--models", "tiny", "--recipes", *recipes, "--device", device,
        "--micro-batch-size", "2", "--seq-length", "64", "--vocab-size", "1000",
        "--warmup-steps", str(warmup), "--steps", str(steps), "--json", str(out), *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture
def launch_env_restored(monkeypatch):
    """distributed.initialize exports RANK, WORLD_SIZE, ... for its one process; unset them after."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(key, "")  # records the original state (unset) for teardown
        monkeypatch.delenv(key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device cpu runs only where CUDA is unavailable")
def test_tiny_preset_on_cpu(tmp_path, capsys, launch_env_restored):
    rc, records = _run_tiny(tmp_path, "cpu", steps=1)
    assert rc == 0
    assert not torch.distributed.is_initialized()  # it tears down the group it made

    assert [(r["model"], r["recipe"]) for r in records] == [("tiny", "bf16"), ("tiny", "averis")]
    flops = training_flops_per_iteration(PRESETS["tiny"].arch, 1024, 64, 2)
    for r in records:
        assert r["error"] is None
        # The trainer's derived sizes: vocabulary padded to 128, one micro-batch per step.
        assert (r["padded_vocab_size"], r["global_batch_size"], r["num_microbatches"]) == (1024, 2, 1)
        assert r["tokens_per_step"] == 128 and r["flops_per_step"] == flops
        assert (r["warmup_steps"], r["timed_steps"], r["skipped_steps"]) == (1, 1, 0)
        assert r["step_ms"] > 0 and r["step_ms_min"] == r["step_ms"] == r["step_ms_max"]
        assert r["tokens_per_second"] == pytest.approx(128 / (r["step_ms"] / 1e3))
        assert r["tflops_per_gpu"] == pytest.approx(flops / (r["step_ms"] / 1e3) / 1e12)
        # Random labels on a freshly initialised model: loss ~ ln(vocabulary).
        assert abs(r["loss"] - math.log(1024)) < 0.3
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        # No peak and no allocation counters on CPU: the fields exist and say so.
        for key in ("mfu", "peak_memory_gib", "activation_memory_gib"):
            assert key in r and r[key] is None
    bf16, averis = records
    assert bf16["ratio_to_bf16"] == 1.0
    # Counted by saved-tensor hooks on every device: the FP4 linears keep packed operands.
    assert 0 < averis["saved_for_backward_gib"] < bf16["saved_for_backward_gib"]
    # Split by the module that saved each storage: the parts add up to the total; the FP4
    # linears keep less than BF16's, every other module (norms, attention, SwiGLU, loss) the same.
    for r in records:
        assert sum(r["saved_by_module_gib"].values()) == pytest.approx(r["saved_for_backward_gib"])
    by_bf16, by_averis = bf16["saved_by_module_gib"], averis["saved_by_module_gib"]
    assert set(by_bf16) == set(by_averis)
    fp4_linears = {"AverisColumnParallelLinear", "AverisRowParallelLinear"}
    assert fp4_linears <= set(by_bf16) and {"RMSNorm", "MLP"} <= set(by_bf16)
    for name in by_bf16:
        if name in fp4_linears:
            assert by_averis[name] < by_bf16[name], name
        else:
            assert by_averis[name] == by_bf16[name], name
    assert averis["ratio_to_bf16"] == pytest.approx(averis["step_ms"] / bf16["step_ms"])

    stdout = capsys.readouterr().out
    assert "## tiny:" in stdout
    assert "| recipe | mode | step ms | ratio to bf16 | tokens/s | TFLOP/s | MFU | peak memory GiB " \
           "| activation memory GiB | saved for backward GiB |" in stdout
    ratio = averis["saved_for_backward_gib"] / bf16["saved_for_backward_gib"]
    assert f"eager: saved for backward / bf16's: averis {ratio:.3f}x" in stdout
    assert "Saved for backward by module (GiB, one micro-batch, eager step;" in stdout
    assert "| module | bf16 | averis |" in stdout
    assert f"| averis | eager | {averis['step_ms']:.1f} | {averis['ratio_to_bf16']:.2f}x |" in stdout
    assert "Targets (issue 18), eager:" in stdout and "graph" not in stdout  # eager only on CPU
    assert "- averis step ≤ 1.03x nvfp4-nohadamard: not measured (needs nvfp4-nohadamard to run)" in stdout
    assert ("- FP4 recipes' activation memory ≤ 70% of BF16's: not measured (needs CUDA (the "
            "allocator measures activation memory) to run)") in stdout


@pytest.mark.gpu
def test_tiny_preset_on_gpu_reports_memory_and_mfu(tmp_path, launch_env_restored):
    """A quick check of the CUDA-only fields before the full benchmark."""
    rc, records = _run_tiny(tmp_path, "cuda", steps=2, warmup=2, extra=["--profile", "averis"])
    assert rc == 0
    assert [(r["recipe"], r["mode"]) for r in records] == [
        ("bf16", "eager"), ("averis", "eager"), ("bf16", "graph"), ("averis", "graph")]
    for r in records:
        assert r["error"] is None and r["peak_tflops"] == 989.0
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 989.0)
        assert 0 < r["activation_memory_gib"] < r["peak_memory_gib"]
        # --profile averis: only its eager record has the GPU-time breakdown
        assert (r["gpu_time_ms"] is not None) == ((r["recipe"], r["mode"]) == ("averis", "eager"))
    gpu = records[1]["gpu_time_ms"]
    assert gpu["Triton _quantize_kernel"][1] > 0 and gpu["cuBLAS GEMMs"][1] > 0
    assert all(ms > 0 and n > 0 for ms, n in gpu.values())


@pytest.mark.gpu
def test_graph_replays_train_exactly_like_eager_steps(tmp_path, launch_env_restored):
    """The trainer's full-iteration CUDA graph (captured at step 2, replayed at steps 3-6) ends
    at the eager run's loss and gradient norm: the replays recompute every step, with the
    stochastic-rounding bits of each step (they are read from device memory, not baked in)."""
    rc, records = _run_tiny(tmp_path, "cuda", steps=4, warmup=2, recipes=("averis", "nvfp4"))
    assert rc == 0
    by = {(r["recipe"], r["mode"]): r for r in records}
    for recipe in ("averis", "nvfp4"):
        eager, graph = by[(recipe, "eager")], by[(recipe, "graph")]
        assert graph["grad_norm"] > 0  # the replay filled the gradient buffers
        assert graph["loss"] == pytest.approx(eager["loss"], rel=1e-6, abs=0)
        assert graph["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-4, abs=0)


def test_targets_pass_and_miss_by_how_much():
    check = _model_step().check_targets
    by_recipe = {"bf16": {"step_ms": 100.0, "mfu": 0.408, "activation_memory_gib": 10.0},
                 "nvfp4-nohadamard": {"step_ms": 200.0, "mfu": 0.15, "activation_memory_gib": 6.5},
                 "averis": {"step_ms": 203.0, "mfu": 0.15, "activation_memory_gib": 7.25}}
    graph = {t["target"]: t for t in check("llama-1b", by_recipe, "graph")}
    assert set(graph) == {"averis step ≤ 1.20x bf16", "averis step ≤ 1.03x nvfp4-nohadamard",
                          "BF16 MFU ≥ 45%", "FP4 recipes' activation memory ≤ 70% of BF16's"}
    assert not graph["averis step ≤ 1.20x bf16"]["passed"]
    assert graph["averis step ≤ 1.20x bf16"]["text"] == "MISSED: 2.030x, by 0.830x"
    assert graph["averis step ≤ 1.03x nvfp4-nohadamard"]["passed"]
    assert graph["averis step ≤ 1.03x nvfp4-nohadamard"]["text"] == "pass: 1.015x, 0.015x to spare"
    assert graph["BF16 MFU ≥ 45%"]["text"] == "MISSED: 40.8%, by 4.2 points"
    # the worst FP4 recipe sets the memory ratio: averis's 7.25 / 10
    memory = graph["FP4 recipes' activation memory ≤ 70% of BF16's"]
    assert memory["value"] == pytest.approx(0.725)
    assert memory["text"] == "MISSED: 72.5% (averis), by 2.5 points"
    eager = {t["target"]: t for t in check("llama-1b", by_recipe, "eager")}
    assert "BF16 MFU ≥ 45%" not in eager  # a graph-mode target
    assert eager["averis step ≤ 1.5x bf16"]["text"] == "MISSED: 2.030x, by 0.530x"
    qwen = {t["target"]: t for t in check("qwen3-0.6b", {"bf16": by_recipe["bf16"]}, "graph")}
    assert set(qwen) == {"averis step ≤ 1.20x bf16", "averis step ≤ 1.03x nvfp4-nohadamard",
                         "FP4 recipes' activation memory ≤ 70% of BF16's"}
    assert qwen["averis step ≤ 1.20x bf16"]["passed"] is None
    assert "(needs an FP4 recipe to run)" in qwen["FP4 recipes' activation memory ≤ 70% of BF16's"]["text"]


def test_gpu_time_counts_kernels_once():
    """GPU kernels are summed by kind; CPU ops and the GPU-timeline user annotations (which span
    kernels already counted, e.g. the optimizer step's) are not."""
    from types import SimpleNamespace as NS

    def event(name, device, start, end, annotation=False):
        return NS(name=name, device_type=NS(name=device), time_range=NS(start=start, end=end),
                  is_user_annotation=annotation)

    adam = "void multi_tensor_apply_kernel<TensorListMetadata<4, false>, multi_tensor_adam>"
    kinds = _model_step().gpu_time_by_kind([
        event("aten::mm", "CPU", 0, 5000),
        event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "CUDA", 0, 1500),
        event("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", "CUDA", 2000, 2500),
        event(adam, "CUDA", 3000, 7000),
        event("Optimizer.step#FusedAdam.step", "CUDA", 3000, 7000, annotation=True),
    ])
    assert kinds == {"cuBLAS GEMMs": [2.0, 2], "other elementwise": [4.0, 1]}


def test_kernel_kinds_and_gpu_time_table(capsys):
    ms = _model_step()
    kinds = {
        "_quantize_kernel": "Triton _quantize_kernel",
        "triton_poi_fused_add_cat_cos_mul_neg_sin_0": "torch.compile fusions",
        "triton_red_fused__to_copy_exp_sub_sum_1": "torch.compile fusions",
        "nvjet_sm90_tss_256x128_64x4_1x2_h_bz_coopA_TNT": "cuBLAS GEMMs",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "cuBLAS GEMMs",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": "attention",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda": "casts and copies",
        "Memcpy DtoD (Device -> Device)": "casts and copies",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>>": "reductions (sums, norms, amax)",
        "Memset (Device)": "memsets and fills",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other elementwise",
    }
    for name, kind in kinds.items():
        assert ms.kernel_kind(name) == kind, name
    ms.print_gpu_time([
        {"recipe": "bf16", "gpu_time_ms": {"cuBLAS GEMMs": [30.0, 300], "attention": [4.0, 28]}},
        {"recipe": "nvfp4", "gpu_time_ms": None},
        {"recipe": "averis", "gpu_time_ms": {"cuBLAS GEMMs": [32.5, 339],
                                             "Triton _quantize_kernel": [40.25, 560]}},
    ])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == [
        "| kernel | bf16 | averis |",
        "|---|---|---|",
        "| Triton _quantize_kernel | – | 40.2 (560) |",
        "| cuBLAS GEMMs | 30.0 (300) | 32.5 (339) |",
        "| attention | 4.0 (28) | – |",
        "| total | 34.0 | 72.8 |",
        "",
    ]
