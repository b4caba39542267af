"""Throughput, model FLOPs utilisation, memory and the one-line progress report."""

from __future__ import annotations

import math
import resource

import torch

# Dense BF16 tensor-core peaks (TFLOP/s per GPU, no sparsity), from NVIDIA's data sheets. FP4
# recipes are measured against the BF16 peak too: it is the same GPU and the comparison between
# recipes stays on one scale.
_BF16_PEAKS = (
    ("H100 PCIe", 756.0, "H100 PCIe"),
    ("H100 NVL", 835.0, "H100 NVL"),
    ("H100", 989.4, "H100 SXM"),
    ("H200 NVL", 835.0, "H200 NVL"),
    ("H200", 989.4, "H200 SXM"),
    ("GH200", 989.4, "GH200"),
    ("A100", 312.0, "A100"),
    ("B200", 2250.0, "B200"),
)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(per-GPU peak TFLOP/s for MFU, a sentence saying what it is)."""
    if override is not None:
        return override, f"{override:g} TFLOP/s per device (--peak-tflops)"
    if device.type != "cuda":
        return None, "no peak for CPUs: MFU is not reported (set --peak-tflops to get it)"
    name = torch.cuda.get_device_name(device)
    for key, value, label in _BF16_PEAKS:
        if key in name:
            return value, f"{value:g} TFLOP/s per GPU ({label} dense BF16 peak)"
    return None, f"unknown GPU {name!r}: MFU is not reported (set --peak-tflops)"


def memory_gib(device: torch.device) -> tuple[float, str]:
    """(GiB, what it measures): CUDA peak allocated since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return value, "peak allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def interval_stats(*, iterations: int, seconds: float, tokens_per_iteration: int,
                   flops_per_iteration: float, world_size: int, peak: float | None) -> dict:
    """Averages over a logging interval of `iterations` iterations that took `seconds`."""
    per_iter = seconds / max(iterations, 1)
    tflops = flops_per_iteration / per_iter / world_size / 1e12
    return {
        "seconds_per_iteration": per_iter,
        "tokens_per_second": tokens_per_iteration / per_iter,
        "tflops_per_gpu": tflops,
        "mfu": (tflops / peak) if peak else None,
    }


def progress_line(m: dict, train_iters: int, per: str = "GPU") -> str:
    """One line per logging interval; `m` holds the keys written to metrics.jsonl; `per`: what
    one rank runs on (GPU, or "rank" on CPUs)."""
    parts = [
        f"step {m['step']:>{len(str(train_iters))}}/{train_iters}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.3e}",
        f"grad-norm {m['grad_norm']:.3f}",
        f"{m['tokens_per_second']:,.0f} tok/s",
        f"{m['tflops_per_gpu']:.1f} TFLOP/s/{per}",
    ]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts += [
        f"mem {m['memory_gib']:.2f} GiB",
        f"{m['seconds_per_iteration']:.3f} s/it",
        f"ETA {format_duration(m['eta_seconds'])}",
    ]
    if m.get("skipped_iterations"):
        parts.append(f"skipped {m['skipped_iterations']}")
    return " | ".join(parts)
