"""Forward+backward time of one quantized linear per recipe, as a ratio to BF16 (one run).

    python benchmarks/linear_step.py [--tokens 8192 --in 1024 --out 3072]
"""

from __future__ import annotations

import argparse

import torch

from megatron_averis.linear import QuantizedLinear
from megatron_averis.recipes import PRESETS


def step_time(recipe, x, gy, k, n, iters):
    layer = QuantizedLinear(k, n, bias=False, recipe=recipe, device=x.device)
    xi = x.clone().requires_grad_()

    def step():
        layer(xi).backward(gy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--in", dest="k", type=int, default=1024)
    p.add_argument("--out", dest="n", type=int, default=3072)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    x = torch.randn(a.tokens, a.k, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(a.tokens, a.n, device="cuda", dtype=torch.bfloat16)
    print(f"# {torch.cuda.get_device_name()}: linear fwd+bwd [{a.tokens} x {a.k}] -> {a.n}")
    print("| recipe | ms | ratio to bf16 |\n|---|---|---|")
    base = None
    for recipe in PRESETS:
        t = step_time(recipe, x, gy, a.k, a.n, a.iters)
        base = base or t
        print(f"| {recipe} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
