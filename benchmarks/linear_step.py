"""One quantized linear per recipe: forward+backward time as a ratio to BF16 (CUDA), and the bytes
its forward keeps for backward (every device).

    python benchmarks/linear_step.py [--tokens 8192 --in 1024 --out 3072] [--device cpu] \
        [--recipe-override token_sum=pairwise --recipe-override fp4_gemm=fused]

--recipe-override changes a knob of every recipe (docs/recipes.md), e.g. the implementation
fields token_sum and fp4_gemm (docs/performance.md).

Saved for backward: linear.saved.SavedBytes around one forward (saved_tensors_hooks, each storage
once, the layer's parameters excluded): BF16 keeps X [tokens, in]; the FP4 recipes keep X's
packed wgrad operand and W's packed dgrad operand (codes, block scales, tensor scale, μ̂).
"""

from __future__ import annotations

import argparse

import torch

from megatron_averis.linear import QuantizedLinear
from megatron_averis.linear.saved import SavedBytes
from megatron_averis.recipes import PRESETS, get_recipe


def saved_bytes(layer, x) -> int:
    with SavedBytes(exclude=list(layer.parameters())) as saved:
        layer(x.clone().requires_grad_())
    return saved.total


def step_time(layer, x, gy, iters):
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: times and bytes; cpu: bytes only")
    p.add_argument("--recipe-override", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every recipe (repeatable)")
    a = p.parse_args()
    device = torch.device(a.device)
    timed = device.type == "cuda"
    x = torch.randn(a.tokens, a.k, device=device, dtype=torch.bfloat16)
    gy = torch.randn(a.tokens, a.n, device=device, dtype=torch.bfloat16)
    name = torch.cuda.get_device_name(device) if timed else "CPU"
    print(f"# {name}: linear fwd+bwd [{a.tokens} x {a.k}] -> {a.n}")
    print("| recipe | ms | ratio to bf16 | saved for backward MiB | ratio to bf16 |\n"
          "|---|---|---|---|---|")
    base_t = base_b = None
    for recipe in PRESETS:
        layer = QuantizedLinear(a.k, a.n, bias=False, recipe=get_recipe(recipe, a.recipe_override),
                                device=device)
        b = saved_bytes(layer, x)
        base_b = base_b or b
        cells = "– | –"
        if timed:
            t = step_time(layer, x, gy, a.iters)
            base_t = base_t or t
            cells = f"{t:.3f} | {t / base_t:.2f}"
        print(f"| {recipe} | {cells} | {b / 2**20:.2f} | {b / base_b:.4f} |")


if __name__ == "__main__":
    main()
