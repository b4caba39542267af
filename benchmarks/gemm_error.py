"""Relative error of the three GEMMs of a linear layer per recipe, on mean-biased operands.

    python benchmarks/gemm_error.py [--device cuda] [--tokens 4096 --in 1024 --out 3072]

Operands imitate LLM activations and gradients: gaussian noise plus a per-feature mean over tokens
of `--mean` standard deviations, and a few outlier features. Errors are ‖Q − exact‖/‖exact‖ of
Y = X·Wᵀ, dX = G·W and dW = Gᵀ·X against float64, through the full quantized linear. Prints a
Markdown table; SR recipes are averaged over `--repeats` calls (different rounding streams).
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from megatron_averis.linear import QuantizedLinear
from megatron_averis.recipes import PRESETS


def operands(t, k, n, mean, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) + mean * torch.randn(k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 20.0  # outlier features
    gy = (torch.randn(t, n, generator=g) + mean * torch.randn(n, generator=g)) * 1e-3
    w = torch.randn(n, k, generator=g) * k**-0.5
    return x.to(device), gy.to(device), w.to(device)


def errors(recipe, x, gy, w):
    layer = QuantizedLinear(w.shape[1], w.shape[0], bias=False, recipe=recipe, device=x.device,
                            dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(w)
    wb = layer.weight.detach().double()
    xb, gb = x.bfloat16(), gy.bfloat16()
    xi = xb.clone().requires_grad_()
    y = layer(xi)
    y.backward(gb)
    exact = (xb.double() @ wb.t(), gb.double() @ wb, gb.double().t() @ xb.double())
    got = (y.detach().double(), xi.grad.double(), layer.weight.grad.double())
    return [((a - b).norm() / b.norm()).item() for a, b in zip(got, exact)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--in", dest="k", type=int, default=1024)
    p.add_argument("--out", dest="n", type=int, default=1024)
    p.add_argument("--mean", type=float, default=4.0, help="mean magnitude in noise std units")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "CPU"
    print(f"# GEMM relative error, {datetime.date.today()}, {name}, torch {torch.__version__}")
    print(f"# X [{a.tokens} x {a.k}], W [{a.n} x {a.k}], mean {a.mean} sigma, {a.repeats} repeats\n")
    print("| recipe | fprop Y | dgrad dX | wgrad dW |")
    print("|---|---|---|---|")
    x, gy, w = operands(a.tokens, a.k, a.n, a.mean, a.seed, dev)
    for recipe in PRESETS:
        runs = [errors(recipe, x, gy, w) for _ in range(a.repeats)]
        mean = [sum(r[i] for r in runs) / len(runs) for i in range(3)]
        print(f"| {recipe} | " + " | ".join(f"{e:.4f}" for e in mean) + " |")


if __name__ == "__main__":
    main()
