"""Whole training step per model and recipe, in one process on one GPU (issues 6 and 18).

    python3 benchmarks/model_step.py [--models qwen3-0.6b llama-1b] [--recipes bf16 nvfp4-nohadamard ...]
        [--micro-batch-size 4] [--seq-length 2048] [--vocab-size 32768] [--json PATH]

Every (model, recipe) is built as the trainer builds it: its flags go through the trainer's parser
and start-up validation (training/arguments.py), and the model, DDP wrapper, optimizer, LR
schedule and train_step are the Trainer's own (training/loop.py). Only the data differs: one
batch of random token ids (--seed), fed to every micro-batch of every step and recipe. The
start-up checks want a tokenizer and a dataset on disk; they get an empty tokenizer file and a
one-document indexed dataset in a temporary directory, neither of which is ever read.

What the table reports, per recipe:
- step ms: median over the timed steps of one Trainer.train_step (zero the gradient buffers,
  megatron-core's forward-backward schedule over all micro-batches, gradient finalization, the
  optimizer step with gradient clipping, the LR step), wall clock between torch.cuda.synchronize()
  calls, after --warmup-steps untimed steps (Triton compilation, cuBLAS heuristics, allocator).
- tokens/s, TFLOP/s, MFU: the trainer's metrics.interval_stats on the median step, with the model
  FLOPs of presets.training_flops_per_iteration (3 x matmul_flops_per_token per token, all recipes
  on the same count) against --peak-tflops.
- peak memory: torch.cuda.max_memory_allocated from building the model to the last step (the
  counter is reset once the previous recipe is freed: model, optimizer, DDP buffers, caches).
- activation memory: torch.cuda.memory_allocated right after the model's forward of a micro-batch
  minus right before it, inside the schedule of the last warm-up step (the first timed step when
  there is no warm-up; the first step in graph mode, the last eager one before the capture is the
  capture itself), i.e. what the forward leaves alive for the backward: saved activations,
  FP4 operands kept for dgrad/wgrad, the per-token losses. Without pipelining, megatron-core runs
  each micro-batch's backward before the next forward, so this is the largest over micro-batches.
  Memory fields are CUDA-only: None on CPU (torch does not count CPU allocations).
- saved for backward: the bytes autograd keeps for backward from the model's forward of a
  micro-batch (linear.saved.SavedBytes: torch.autograd.graph.saved_tensors_hooks, each storage
  once, parameters excluded), the largest over the micro-batches of the same step; measured on
  every device. The FP4 linears' share of it is their packed wgrad/dgrad operands (FP4 codes,
  scales, μ̂), not BF16 copies of their inputs; the report prints each recipe's total over BF16's.

--profile RECIPE...: one more eager step of each named recipe under torch.profiler, and a table
per model of its GPU time by kernel: the project's Triton kernels by name, the rest by kind
(cuBLAS GEMMs, attention, casts and copies, reductions, other elementwise). The kernels of a
graph replay are those of the eager step, so this is also what bounds a graphed step.

Modes (--modes): eager, and graph = the trainer's --cuda-graph-impl local (training/cuda_graph.py:
the forward-backward schedule captured once as a CUDA graph and replayed; the graph is captured at
the last warm-up step, so every timed step is a replay). Ratios compare recipes in the same mode.

--device cpu is a smoke mode for machines without CUDA: megatron-core runs on the CPU through
training/cpu_compat.py and the FP4 linears use the PyTorch reference numerics.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings
import weakref

# This checkout's package, whatever an installed (editable) megatron_averis points at: the
# benchmark relies on Trainer._build_model_and_optimizer of the same tree.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# By design there is no TE/apex (as in megatron_averis/pretrain.py); megatron-core warns per module.
warnings.filterwarnings(
    "ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_averis.linear.saved import RunningModule, SavedBytes  # noqa: E402
from megatron_averis.recipes import PRESETS as RECIPE_PRESETS  # noqa: E402
from megatron_averis.te.availability import te_installed  # noqa: E402
from megatron_averis.training import distributed  # noqa: E402
from megatron_averis.training.arguments import ConfigError, finalize_args, parse_args  # noqa: E402
from megatron_averis.training.config import TrainingConfig  # noqa: E402
from megatron_averis.training.cpu_compat import cpu_training  # noqa: E402
from megatron_averis.training.cuda_graph import side_stream  # noqa: E402
from megatron_averis.training.divergence import DivergenceGuard  # noqa: E402
from megatron_averis.training.loop import Trainer  # noqa: E402
from megatron_averis.training.metrics import interval_stats, memory_gib, peak_tflops  # noqa: E402
from megatron_averis.training.presets import PRESETS as MODEL_PRESETS  # noqa: E402
from megatron_averis.training.presets import (parameter_counts,  # noqa: E402
                                              training_flops_per_iteration)
from megatron_averis.training.rng_state import seed_everything  # noqa: E402

DEFAULT_MODELS = ("qwen3-0.6b", "llama-1b")
DEFAULT_RECIPES = ("bf16", "nvfp4-nohadamard", "nvfp4", "averis", "averis-rht")
MODES = ("eager", "graph")
H100_SXM_BF16_TFLOPS = 989.0  # dense, no sparsity (H200 SXM has the same tensor cores)


def _log(message: str) -> None:
    print(f"[model_step] {message}", file=sys.stderr, flush=True)


def _out(text: str = "") -> None:
    print(text, flush=True)  # flushed: run_all.sh tees it into the report as it comes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_kind(name: str) -> str:
    """The row of the GPU-time table that a CUDA kernel's name belongs to."""
    low = name.lower()
    if name.startswith("_") and name.endswith("_kernel"):
        return f"Triton {name}"  # this project's kernels (megatron_averis/kernels)
    if name.startswith("triton_"):
        # Inductor's names (triton_poi_fused_..., triton_red_fused_...): megatron/fusions.py's
        # torch.compile'd SwiGLU, RoPE and cross entropy.
        return "torch.compile fusions"
    for kind, marks in (("cuBLAS GEMMs", ("nvjet", "gemm", "cutlass", "xmma")),
                        ("attention", ("sdpa", "flash", "fmha", "attention")),
                        ("casts and copies", ("copy", "memcpy")),
                        ("reductions (sums, norms, amax)", ("reduce", "norm", "softmax")),
                        ("memsets and fills", ("memset", "fill"))):
        if any(m in low for m in marks):
            return kind
    return "other elementwise"


def profile_step(bench, data, device: torch.device) -> dict:
    """{kind: [ms, launches]} of the GPU kernels of one train_step (torch.profiler, CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench.train_step(data)
        _sync(device)
    bench.iteration += 1
    return gpu_time_by_kind(prof.events())


def gpu_time_by_kind(events) -> dict:
    """{kind: [ms, launches]} of the GPU's kernels, memcpys and memsets among profiler events.
    CPU ops are skipped, and so are user annotations that the profiler also draws on the GPU
    timeline (e.g. Optimizer.step#FusedAdam.step): they span kernels counted on their own."""
    kinds: dict = {}
    for e in events:
        if e.device_type.name != "CUDA" or getattr(e, "is_user_annotation", False):
            continue
        row = kinds.setdefault(kernel_kind(e.name), [0.0, 0])
        row[0] += (e.time_range.end - e.time_range.start) / 1e3  # microseconds -> ms
        row[1] += 1
    return kinds


class _StepBench(Trainer):
    """The Trainer's model, optimizer, schedule and train_step on a fixed synthetic batch.

    Trainer.__init__ is not run: it loads a tokenizer and datasets and opens logs and checkpoints,
    none of which a step needs. What it does before building is repeated here (parallel-state
    queries, seeding); the build itself is Trainer._build_model_and_optimizer."""

    def __init__(self, cfg: TrainingConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.world = torch.distributed.get_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        seed_everything(cfg.execution.seed, parallel_state.get_pipeline_model_parallel_rank())
        self.iteration = 0
        self._build_model_and_optimizer()
        self._build_schedules()
        self.guard = DivergenceGuard(cfg.fault_tolerance)
        self.activation_bytes: list[int] | None = None  # lists while measuring
        self.saved_bytes: list[SavedBytes] | None = None

    def _forward_step(self, data_iterator, model):
        if self.saved_bytes is None:
            return super()._forward_step(data_iterator, model)
        # The schedule calls this once per micro-batch; the backward comes after it returns.
        on_gpu = self.device.type == "cuda"
        before = torch.cuda.memory_allocated(self.device) if on_gpu else 0
        with RunningModule() as running, SavedBytes(
                exclude=[p for m in self.model for p in m.parameters()], label=running.name) as saved:
            result = super()._forward_step(data_iterator, model)
        if on_gpu:
            self.activation_bytes.append(torch.cuda.memory_allocated(self.device) - before)
        self.saved_bytes.append(saved)
        return result


def synthetic_batch(micro_batch_size: int, seq_length: int, vocab_size: int, seed: int,
                    device: torch.device) -> dict:
    """One micro-batch in the layout of megatron-core's GPTDataset (what Trainer._forward_step
    reads): random ids, labels = the next id, every token in the loss."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=gen)
    positions = torch.arange(seq_length, dtype=torch.long).expand(micro_batch_size, -1)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:],
             "loss_mask": torch.ones(micro_batch_size, seq_length, dtype=torch.float32),
             "position_ids": positions}
    return {k: v.contiguous().to(device) for k, v in batch.items()}


def _unread_data_files(root: str) -> tuple[str, str]:
    """(tokenizer path, dataset prefix) that exist for the trainer's start-up checks; the
    benchmark feeds random token ids and never reads them."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer = os.path.join(root, "unread-tokenizer.model")
    open(tokenizer, "wb").close()
    prefix = os.path.join(root, "unread-data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    builder.add_document(np.zeros(1, dtype=np.int32), [1])
    builder.finalize(prefix + ".idx")
    return tokenizer, prefix


def trainer_flags(model: str, recipe: str, opts, tokenizer: str, data_prefix: str,
                  mode: str = "eager") -> list[str]:
    flags = ["--model-preset", model, "--seq-length", str(opts.seq_length),
             "--micro-batch-size", str(opts.micro_batch_size),
             "--global-batch-size", str(opts.global_batch_size),
             "--train-iters", str(opts.warmup_steps + opts.steps), "--lr", "1e-4",
             "--seed", str(opts.seed), "--tokenizer-model", tokenizer, "--data-path", data_prefix,
             "--split", "1,0,0", "--eval-iters", "0", "--num-workers", "0",
             "--cross-entropy-loss-fusion"]  # the launch scripts' fused ops (docs/performance.md)
    flags += ["--bf16"] if recipe == "bf16" else ["--fp4-recipe", recipe]
    if mode == "graph":  # captured at the last warm-up step: every timed step is a replay
        flags += ["--cuda-graph-impl", "local",
                  "--cuda-graph-warmup-steps", str(max(opts.warmup_steps - 1, 1))]
    return flags + shlex.split(opts.trainer_args)  # last: they override the above


def trainer_config(model: str, recipe: str, opts, tokenizer: str, data_prefix: str,
                   mode: str = "eager") -> TrainingConfig:
    """The trainer's validated configuration, with the vocabulary of --vocab-size (the
    benchmark's random token ids) in place of the tokenizer's."""
    args = finalize_args(parse_args(trainer_flags(model, recipe, opts, tokenizer, data_prefix, mode)),
                         1)
    return TrainingConfig.from_args(args, opts.vocab_size)


def run_recipe(model: str, recipe: str, cfg: TrainingConfig, opts, device: torch.device, batch: dict,
               peak: float | None, mode: str = "eager") -> tuple[dict, weakref.ref]:
    """Build, warm up, time; the record and a weak reference to the model (to check it is freed)."""
    on_gpu = device.type == "cuda"
    start = time.monotonic()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    bench = _StepBench(cfg, device)
    model_ref = weakref.ref(bench.model[0])
    data = itertools.repeat(batch)  # Trainer._forward_step takes next() per micro-batch
    measure_at = 0 if mode == "graph" else max(opts.warmup_steps - 1, 0)
    times, activation, saved, saved_by_module, skipped = [], None, None, None, 0
    for i in range(opts.warmup_steps + opts.steps):
        bench.saved_bytes = [] if i == measure_at else None
        bench.activation_bytes = [] if on_gpu and i == measure_at else None
        _sync(device)
        t0 = time.perf_counter()
        loss, grad_norm, _, updated, _ = bench.train_step(data)
        _sync(device)
        seconds = time.perf_counter() - t0
        bench.iteration += 1
        if bench.activation_bytes is not None:
            activation = max(bench.activation_bytes) / 2**30
        if bench.saved_bytes is not None:
            largest = max(bench.saved_bytes, key=lambda b: b.total)
            saved = largest.total / 2**30
            saved_by_module = {k: v / 2**30 for k, v in sorted(largest.by_label.items())}
        bench.activation_bytes = bench.saved_bytes = None
        if i >= opts.warmup_steps:
            times.append(seconds)
            skipped += 0 if updated else 1
    gpu_time = (profile_step(bench, data, device)
                if on_gpu and mode == "eager" and recipe in opts.profile else None)
    median = statistics.median(times)
    tokens = cfg.batch.global_batch_size * cfg.batch.seq_length
    flops = training_flops_per_iteration(cfg.model.arch, cfg.model.padded_vocab_size,
                                         cfg.batch.seq_length, cfg.batch.global_batch_size)
    stats = interval_stats(iterations=1, seconds=median, tokens_per_iteration=tokens,
                           flops_per_iteration=flops, world_size=1, peak=peak)
    record = _record(model, recipe, cfg, opts, device, mode) | {
        "step_ms": 1e3 * median,
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        "tokens_per_second": stats["tokens_per_second"],
        "tflops_per_gpu": stats["tflops_per_gpu"],
        "mfu": stats["mfu"],
        "peak_memory_gib": memory_gib(device)[0] if on_gpu else None,
        "activation_memory_gib": activation,
        "saved_for_backward_gib": saved,
        "saved_by_module_gib": saved_by_module,
        "loss": (loss[0] / loss[1]).item(),  # of the last step; ~ln(vocab) at initialisation
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "skipped_steps": skipped,
        "gpu_time_ms": gpu_time,
        "seconds_total": time.monotonic() - start,
    }
    return record, model_ref


def _record(model: str, recipe: str, cfg: TrainingConfig, opts, device: torch.device,
            mode: str) -> dict:
    batch, arch, padded = cfg.batch, cfg.model.arch, cfg.model.padded_vocab_size
    """The fields every record has, also a failed one."""
    return {
        "model": model, "recipe": recipe, "mode": mode,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "micro_batch_size": batch.micro_batch_size, "global_batch_size": batch.global_batch_size,
        "num_microbatches": batch.num_microbatches, "seq_length": batch.seq_length,
        "vocab_size": cfg.data.tokenizer_vocab_size, "padded_vocab_size": padded,
        "tokens_per_step": batch.global_batch_size * batch.seq_length,
        "flops_per_step": training_flops_per_iteration(arch, padded, batch.seq_length,
                                                       batch.global_batch_size),
        "parameters": parameter_counts(arch, padded)["total"],
        "warmup_steps": opts.warmup_steps, "timed_steps": opts.steps,
        "peak_tflops": opts.peak_tflops, "trainer_args": opts.trainer_args,
        "step_ms": None, "step_ms_min": None, "step_ms_max": None, "ratio_to_bf16": None,
        "tokens_per_second": None, "tflops_per_gpu": None, "mfu": None, "peak_memory_gib": None,
        "activation_memory_gib": None, "saved_for_backward_gib": None, "saved_by_module_gib": None, "loss": None, "grad_norm": None, "skipped_steps": None,
        "gpu_time_ms": None, "seconds_total": None, "error": None,
    }


def _free(device: torch.device) -> None:
    gc.collect()  # DDP hooks, config callbacks and optimizer make reference cycles with the model
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- report ---------------------------------------------------------------------------------

def _num(value, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _ratio(by_recipe: dict, num: str, den: str) -> float | None:
    a, b = by_recipe.get(num), by_recipe.get(den)
    if a is None or b is None or a["step_ms"] is None or b["step_ms"] is None:
        return None
    return a["step_ms"] / b["step_ms"]


FP4_RECIPES = tuple(r for r in DEFAULT_RECIPES if r != "bf16")
# Issue 18's targets: (models or None for every model, mode or None for both, text, kind, numerator, denominator, bound).
# kind "ratio": step time num / den ≤ bound; "mfu": num's MFU ≥ bound; "memory": the largest
# activation memory of the FP4 recipes measured over den's ≤ bound.
TARGETS = (
    (DEFAULT_MODELS, "graph", "averis step ≤ 1.20x bf16", "ratio", "averis", "bf16", 1.20),
    (DEFAULT_MODELS, "eager", "averis step ≤ 1.5x bf16", "ratio", "averis", "bf16", 1.5),
    (None, None, "averis step ≤ 1.03x nvfp4-nohadamard", "ratio", "averis",
     "nvfp4-nohadamard", 1.03),
    (("llama-1b",), "graph", "BF16 MFU ≥ 45%", "mfu", "bf16", None, 0.45),
    (None, None, "FP4 recipes' activation memory ≤ 70% of BF16's", "memory", None,
     "bf16", 0.70),
)


def _memory_ratio(by_recipe: dict, den: str) -> tuple[float | None, str | None]:
    """The largest activation memory of the FP4 recipes measured, over `den`'s, and whose."""
    base = by_recipe.get(den, {}).get("activation_memory_gib")
    fp4 = {n: r.get("activation_memory_gib") for n, r in by_recipe.items() if n in FP4_RECIPES}
    fp4 = {n: v for n, v in fp4.items() if v is not None}
    if not base or not fp4:
        return None, None
    worst = max(fp4, key=fp4.get)
    return fp4[worst] / base, worst


def check_targets(model: str, by_recipe: dict, mode: str = "graph") -> list[dict]:
    """Issue 18's targets that apply to this model in `mode` (eager or graph), measured or not."""
    results = []
    for models, applies_in, text, kind, num, den, bound in TARGETS:
        if (models is not None and model not in models) or applies_in not in (None, mode):
            continue
        if kind == "ratio":
            value = _ratio(by_recipe, num, den)
            passed = None if value is None else value <= bound
            margin = None if value is None else abs(value - bound)
            shown = _num(value, ".3f", "x")  # 3 digits: the averis/nvfp4-nohadamard bound is 1.03
            by = _num(margin, ".3f", "x")
        elif kind == "memory":
            value, worst = _memory_ratio(by_recipe, den)
            passed = None if value is None else value <= bound
            margin = None if value is None else abs(value - bound)
            shown = _num(None if value is None else 100 * value, ".1f", f"% ({worst})")
            by = _num(None if margin is None else 100 * margin, ".1f", " points")
        else:
            rec = by_recipe.get(num)
            value = rec["mfu"] if rec is not None else None
            passed = None if value is None else value >= bound
            margin = None if value is None else abs(value - bound)
            shown = _num(None if value is None else 100 * value, ".1f", "%")
            by = _num(None if margin is None else 100 * margin, ".1f", " points")
        if passed is None:
            needs = [r for r in (num, den) if r and r not in by_recipe]
            if kind == "memory" and not needs:
                needs = (["an FP4 recipe"] if not set(by_recipe) & set(FP4_RECIPES)
                         else ["CUDA (the allocator measures activation memory)"])
            verdict = f"not measured (needs {' and '.join(needs)} to run)"
        elif passed:
            verdict = f"pass: {shown}, {by} to spare"
        else:
            verdict = f"MISSED: {shown}, by {by}"
        results.append({"model": model, "mode": mode, "target": text, "value": value,
                        "bound": bound, "passed": passed, "text": verdict})
    return results


def print_model_report(model: str, records: list[dict]) -> None:
    first = records[0]
    _out(f"## {model}: {first['parameters'] / 1e6:,.1f}M parameters, "
         f"{first['flops_per_step'] / 1e12:,.2f} model TFLOP per step")
    _out()
    _out("| recipe | mode | step ms | ratio to bf16 | tokens/s | TFLOP/s | MFU | peak memory GiB "
         "| activation memory GiB | saved for backward GiB |")
    _out("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if r["error"] is not None:
            _out(f"| {r['recipe']} | {r['mode']} | failed: {r['error'].splitlines()[0][:80]} "
                 "| | | | | | | |")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        _out(f"| {r['recipe']} | {r['mode']} | {r['step_ms']:.1f} "
             f"| {_num(r['ratio_to_bf16'], '.2f', 'x')} | {r['tokens_per_second']:,.0f} "
             f"| {r['tflops_per_gpu']:.1f} | {_num(mfu, '.1f', '%')} "
             f"| {_num(r['peak_memory_gib'], '.2f')} | {_num(r['activation_memory_gib'], '.2f')} "
             f"| {_num(r['saved_for_backward_gib'], '.3f')} |")
    _out()
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    for mode in modes:
        by_recipe = {r["recipe"]: r for r in records if r["error"] is None and r["mode"] == mode}
        bf16 = by_recipe.get("bf16")
        bf16_mfu = None if bf16 is None or bf16["mfu"] is None else 100 * bf16["mfu"]
        _out(f"{mode}: averis / nvfp4-nohadamard "
             f"{_num(_ratio(by_recipe, 'averis', 'nvfp4-nohadamard'), '.2f', 'x')} | "
             f"nvfp4 / nvfp4-nohadamard {_num(_ratio(by_recipe, 'nvfp4', 'nvfp4-nohadamard'), '.2f', 'x')} | "
             f"BF16 MFU {_num(bf16_mfu, '.1f', '%')}")
        saved = {name: r["saved_for_backward_gib"] for name, r in by_recipe.items()}
        if saved.get("bf16"):
            _out(f"{mode}: saved for backward / bf16's: " + ", ".join(
                f"{name} {_num(v / saved['bf16'], '.3f', 'x')}" for name, v in saved.items()
                if name != "bf16" and v is not None))
    if len(modes) == 2:
        ok = [r for r in records if r["error"] is None]
        speedups = []
        for recipe in dict.fromkeys(r["recipe"] for r in ok):
            pair = {r["mode"]: r for r in ok if r["recipe"] == recipe}
            if len(pair) == 2:
                speedups.append(f"{recipe} {pair['eager']['step_ms'] / pair['graph']['step_ms']:.2f}x")
        _out("graph speed-up over eager (eager ms / graph ms): " + ", ".join(speedups))
    _out()
    for mode in modes:
        by_recipe = {r["recipe"]: r for r in records if r["error"] is None and r["mode"] == mode}
        _out(f"Targets (issue 18), {mode}:")
        for t in check_targets(model, by_recipe, mode):
            _out(f"- {t['target']}: {t['text']}")
        _out()
    print_saved_by_module(records)
    print_gpu_time(records)


def print_saved_by_module(records: list[dict]) -> None:
    """What bounds the activation memory: saved-for-backward bytes by the module that saved them
    (the innermost one running), per recipe, from the first mode measured."""
    measured = [r for r in records if r["error"] is None and r.get("saved_by_module_gib")]
    if not measured:
        return
    measured = [r for r in measured if r["mode"] == measured[0]["mode"]]
    rows = {name for r in measured for name in r["saved_by_module_gib"]}
    first = measured[0]["saved_by_module_gib"]
    order = sorted(rows, key=lambda n: -first.get(n, 0.0))
    _out(f"Saved for backward by module (GiB, one micro-batch, {measured[0]['mode']} step; "
         "the innermost module running when a tensor was saved):")
    _out()
    _out("| module | " + " | ".join(r["recipe"] for r in measured) + " |")
    _out("|---|" + "---|" * len(measured))
    for name in order:
        cells = [r["saved_by_module_gib"].get(name) for r in measured]
        _out(f"| {name} | " + " | ".join(_num(c, ".3f") for c in cells) + " |")
    _out("| total | " + " | ".join(_num(r["saved_for_backward_gib"], ".3f") for r in measured)
         + " |")
    _out()


def print_gpu_time(records: list[dict]) -> None:
    profiled = [r for r in records if r.get("gpu_time_ms")]
    if not profiled:
        return
    rows = {kind for r in profiled for kind in r["gpu_time_ms"]}
    order = sorted(rows, key=lambda k: -max(r["gpu_time_ms"].get(k, [0.0])[0] for r in profiled))
    _out("GPU time per step by kernel (torch.profiler, one eager step; ms, launches):")
    _out()
    _out("| kernel | " + " | ".join(r["recipe"] for r in profiled) + " |")
    _out("|---|" + "---|" * len(profiled))
    for kind in order:
        cells = [r["gpu_time_ms"].get(kind) for r in profiled]
        _out(f"| {kind} | " + " | ".join("–" if c is None else f"{c[0]:.1f} ({c[1]})" for c in cells)
             + " |")
    _out("| total | " + " | ".join(f"{sum(c[0] for c in r['gpu_time_ms'].values()):.1f}"
                                    for r in profiled) + " |")
    _out()


# -- command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MODEL_PRESETS),
                   help="model presets (training/presets.py); 'tiny' for smoke tests")
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=list(RECIPE_PRESETS),
                   help="recipes, run in this order (ratios are to bf16)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="default: the micro-batch (one micro-batch per step)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32768,
                   help="synthetic vocabulary (padded as the trainer pads a tokenizer's)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"per-GPU peak for MFU (default {H100_SXM_BF16_TFLOPS:g}, H100/H200 SXM dense "
                        "BF16; none on CPU)")
    p.add_argument("--seed", type=int, default=1234, help="weights (as the trainer) and token ids")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available; cpu only where CUDA is unavailable")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="eager and/or graph (the trainer's --cuda-graph-impl local); default: both on "
                        "CUDA, eager on CPU")
    p.add_argument("--trainer-args", default="",
                   help="more trainer flags for every run, e.g. "
                        "--trainer-args='--recompute-granularity selective'")
    p.add_argument("--profile", nargs="+", default=[], choices=list(RECIPE_PRESETS), metavar="RECIPE",
                   help="one more eager step of these recipes under torch.profiler: GPU time by "
                        "kernel (CUDA, eager mode)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the records (one per model x recipe) as a JSON list")
    return p


def _choose_device(opts) -> torch.device:
    env = distributed.LaunchEnv.from_environ()
    if env.world_size != 1:
        raise SystemExit("model_step.py is one process on one device; run it without torchrun")
    if opts.device == "cpu" and torch.cuda.is_available():
        # cpu_compat's shims switch on only without CUDA, and megatron-core needs them on a CPU.
        raise SystemExit("--device cpu needs CUDA to be unavailable: run with CUDA_VISIBLE_DEVICES=")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    return distributed.device_for(env)


def _versions() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    te = "importable" if te_installed() else "not importable (not installed, or hidden)"
    return f"torch {torch.__version__}, triton {triton_version}, Transformer Engine {te}"


def _run_logged(model: str, recipe: str, mode: str, cfg: TrainingConfig, opts,
                device: torch.device, batch: dict, peak: float | None) -> dict:
    """run_recipe, logged; a failure (e.g. out of memory) becomes a record with its error."""
    _log(f"{model} {recipe} {mode}: building and running {opts.warmup_steps} + {opts.steps} steps")
    model_ref = None
    try:
        with side_stream(mode == "graph", device):  # where the trainer runs a graphed model
            record, model_ref = run_recipe(model, recipe, cfg, opts, device, batch, peak, mode)
    except Exception as e:  # report it, go on with the rest
        traceback.print_exc()
        record = _record(model, recipe, cfg, opts, device, mode)
        record["error"] = f"{type(e).__name__}: {e}"
        _log(f"{model} {recipe} {mode}: FAILED ({type(e).__name__})")
    _free(device)
    if model_ref is not None and model_ref() is not None:
        _log(f"warning: the {recipe} model is still referenced after freeing; the next recipes' "
             "peak memory includes it")
    if record["error"] is None:
        _log(f"{model} {recipe} {mode}: {record['step_ms']:.1f} ms/step (median of {opts.steps}; "
             f"{record['step_ms_min']:.1f}-{record['step_ms_max']:.1f}), peak "
             f"{_num(record['peak_memory_gib'], '.2f')} GiB, activations "
             f"{_num(record['activation_memory_gib'], '.2f')} GiB, loss {record['loss']:.4f}, "
             f"{record['seconds_total']:.1f} s")
    return record


def main(argv=None) -> int:
    """0 when every (model, recipe) ran, 1 when some failed (they are reported and skipped), 2 on
    a configuration error."""
    opts = build_parser().parse_args(argv)
    if opts.global_batch_size is None:
        opts.global_batch_size = opts.micro_batch_size
    if opts.steps < 1 or opts.warmup_steps < 0:
        raise SystemExit("--steps must be >= 1 and --warmup-steps >= 0")
    device = _choose_device(opts)
    if opts.modes is None:
        opts.modes = list(MODES) if device.type == "cuda" else ["eager"]
    if "graph" in opts.modes and (device.type != "cuda" or opts.warmup_steps < 2):
        raise SystemExit("--modes graph needs CUDA and --warmup-steps >= 2 (eager steps, then the "
                         "capture at the last warm-up step)")
    if opts.profile and (device.type != "cuda" or "eager" not in opts.modes):
        raise SystemExit("--profile needs CUDA and the eager mode (the graph replays the same "
                         "kernels)")
    if opts.peak_tflops is None and device.type == "cuda":
        opts.peak_tflops = H100_SXM_BF16_TFLOPS
        peak = opts.peak_tflops
        # What the trainer's table of GPUs would use, so that a run on another GPU shows it.
        peak_text = (f"{peak:g} TFLOP/s (default: H100/H200 SXM dense BF16; the trainer's table "
                     f"says {peak_tflops(device, None)[1]})")
    else:
        peak, peak_text = peak_tflops(device, opts.peak_tflops)
    if torch.distributed.is_initialized():
        raise SystemExit("torch.distributed is already initialized; model_step.py sets up its own "
                         "single-rank group")

    with tempfile.TemporaryDirectory(prefix="model_step-") as tmp:
        tokenizer, data_prefix = _unread_data_files(tmp)
        # Every configuration through the trainer's validation before any device time is spent.
        try:
            configs = {(m, r, mode): trainer_config(m, r, opts, tokenizer, data_prefix, mode)
                        for m in opts.models for mode in opts.modes for r in opts.recipes}
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2

    first = next(iter(configs.values()))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (PyTorch reference numerics)"
    _out(f"# Training step per recipe: {name}, {_versions()}")
    _out()
    fb = first.batch
    _out(f"micro-batch {fb.micro_batch_size} x seq {fb.seq_length}, global batch "
         f"{fb.global_batch_size} ({fb.num_microbatches} micro-batch(es) per step), "
         f"{fb.global_batch_size * fb.seq_length:,} tokens per step; vocabulary "
         f"{opts.vocab_size} (padded {first.model.padded_vocab_size}), random token ids; "
         f"{opts.warmup_steps} warm-up + {opts.steps} timed steps, median; MFU against {peak_text}"
         + (f"; trainer flags {opts.trainer_args!r}" if opts.trainer_args else ""))
    _out()

    records: list[dict] = []
    with cpu_training():
        distributed.initialize(first, distributed.LaunchEnv.from_environ(), device)
        try:
            batch = synthetic_batch(opts.micro_batch_size, opts.seq_length, opts.vocab_size,
                                    opts.seed, device)
            for model in opts.models:
                # Each model's compiled fusions start from an empty cache, as in a training
                # process of its own: no compile of one model's shapes is reused or widened
                # to symbolic sizes by the next.
                torch._dynamo.reset()
                model_records = []
                for mode in opts.modes:
                    mode_records = [_run_logged(model, recipe, mode, configs[(model, recipe, mode)],
                                                opts, device, batch, peak)
                                    for recipe in opts.recipes]
                    base = next((r for r in mode_records
                                 if r["recipe"] == "bf16" and r["error"] is None), None)
                    for r in mode_records:
                        if base is not None and r["error"] is None:
                            r["ratio_to_bf16"] = r["step_ms"] / base["step_ms"]
                    model_records += mode_records
                print_model_report(model, model_records)
                records += model_records
            del batch
            _free(device)
        finally:
            distributed.shutdown()

    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2)
        _log(f"records written to {opts.json}")
    return 1 if any(r["error"] is not None for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
