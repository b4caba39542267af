"""FP4 kernel throughput and per-GEMM cost against BF16, in one run on one GPU.

    python3 benchmarks/quant_kernels.py [--tokens 8192] [--quick]

Table 1: each kernel's achieved GB/s (bytes it must read + write / time) and its share of the
device-to-device copy bandwidth measured in the same run on the same number of bytes.
Table 1b: the GEMM operand (code × block scale in BF16) in one pass (quantize writes it, with or
without the packed payload) against quantize then dequantize, in GB/s and share of copy.
Table 2: for every GEMM of a Qwen3-0.6B and a Llama-1B layer (qkv, proj, fc1, fc2; fprop, dgrad,
wgrad), the time to quantize its operands and run the emulated FP4 GEMM, over the time of the BF16
GEMM, per recipe and per GEMM implementation (the recipe field fp4_gemm: dequant | fused). Table 3:
the GEMM alone (operands already quantized) against torch.mm(out_dtype=float32) on BF16 values.

Every time is GPU time: the call is captured REPS times in a CUDA graph, each preceded by a 256 MB
write that evicts the L2 cache, and the graph of the writes alone is subtracted. Timing the calls
from Python instead (triton.testing.do_bench) measures the host's launch path for the smaller
shapes: a 16 MB quantization waits ~60 us for its arguments to be prepared, longer than it runs.
The model's training step runs these kernels from a CUDA graph too (model_step.py, graph mode).
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from megatron_averis.kernels import fp4
from megatron_averis.numerics import backend, qgemm, quantize_mxfp4, quantize_nvfp4, quantize_operand
from megatron_averis.numerics.operand import token_mean
from megatron_averis.numerics.qgemm import mm_fp32
from megatron_averis.numerics.random import seed_key

# (hidden, ffn, q heads x head dim, kv heads x head dim) from the models' config.json
MODELS = {
    "qwen3-0.6b": dict(hidden=1024, ffn=3072, q=16 * 128, kv=8 * 128),
    "llama-1b": dict(hidden=2048, ffn=8192, q=32 * 64, kv=8 * 64),
}


def layer_linears(m):
    """(name, in_features, out_features); fc1 is SwiGLU's fused gate+up projection."""
    h = m["hidden"]
    return [("qkv", h, m["q"] + 2 * m["kv"]), ("proj", m["q"], h),
            ("fc1", h, 2 * m["ffn"]), ("fc2", m["ffn"], h)]


DEVICE = "cuda"


REPS = 10  # captured calls per graph
_L2_EVICT_BYTES = 256 * 2**20  # more than any GPU's L2 (H100: 50 MB)


def _graph_ms(body, replays: int = 5) -> float:
    """Median milliseconds of one replay of a CUDA graph that runs body() once."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2]


def host_bench(fn) -> float:
    """Median milliseconds per call timed from Python (triton's do_bench, L2 flushed), for the
    PyTorch reference: its host-to-device table copies cannot be captured in a graph."""
    if DEVICE != "cuda":  # --device cpu: a smoke test of this script through Triton's interpreter
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def bench(fn) -> float:
    """GPU milliseconds per call of fn, L2 evicted before each call (see the module docstring)."""
    if DEVICE != "cuda":
        return host_bench(fn)
    evict = torch.empty(_L2_EVICT_BYTES, dtype=torch.uint8, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compilation, autotuning, library handles: before capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def calls():
        for _ in range(REPS):
            evict.zero_()
            fn()

    def evictions():
        for _ in range(REPS):
            evict.zero_()

    return max(_graph_ms(calls) - _graph_ms(evictions), 0.0) / REPS


def copy_gbps(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src)) / 1e6


def _operand(rows, cols):
    """A BF16 operand [rows, cols], its mean over rows as the Averis split stores it (BF16, used
    in FP32), its amax, and the copy bandwidth on its bytes (2 read + 2 written per element)."""
    x = torch.randn(rows, cols, device=DEVICE, dtype=torch.bfloat16)
    mean = x.float().mean(0).to(torch.bfloat16).float().view(1, -1)
    return x, mean, x.abs().amax().float(), copy_gbps(2 * rows * cols)


def _table(title: str, columns, shapes):
    """Print a table's title and header; yield (rows, cols, *_operand(rows, cols)) per shape."""
    print(f"\n## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for rows, cols in shapes:
        yield (rows, cols) + _operand(rows, cols)


def kernel_table(shapes):
    columns = ("kernel", "shape", "ms", "GB/s", "% of copy", "PyTorch reference ms (host-timed)",
               "speed-up")
    for rows, cols, x, mean, amax, copy in _table("Kernel bandwidth (BF16 input)", columns, shapes):
        n = rows * cols
        xt_src = torch.randn(cols, rows, device=DEVICE, dtype=torch.bfloat16)  # operand = src.t()
        mean_t = xt_src.float().mean(0).to(torch.bfloat16).float().view(-1, 1)
        q16 = quantize_nvfp4(x)
        packed = n // 2
        cases = [
            ("token stats (pairwise sums, min, max)", lambda: fp4.token_stats(x, 0), 2 * n),
            ("amax abs(x - mean)", lambda: fp4.amax(x, mean), 2 * n),
            ("nvfp4 1x16 rne", lambda: quantize_nvfp4(x, amax=amax), 2 * n + packed + n // 16),
            ("nvfp4 1x16 rne, mean", lambda: quantize_nvfp4(x, amax=amax, subtract=mean),
             2 * n + packed + n // 16),
            ("nvfp4 1x16 sr, mean", lambda: quantize_nvfp4(
                x, rounding="stochastic", sr_seed=1, amax=amax, subtract=mean), 2 * n + packed + n // 16),
            ("nvfp4 1x16 sr, mean, Xᵀ", lambda: quantize_nvfp4(
                xt_src.t(), rounding="stochastic", sr_seed=1, amax=amax, subtract=mean_t),
             2 * n + packed + n // 16),
            ("nvfp4 16x16 rne", lambda: quantize_nvfp4(x, (16, 16), amax=amax), 2 * n + packed + n // 256),
            ("mxfp4 rne", lambda: quantize_mxfp4(x), 2 * n + packed + n // 32),
            ("dequant -> bf16", lambda: q16.scaled_values(), packed + n // 16 + 2 * n),
        ]
        for name, fn, nbytes in cases:
            t = bench(fn)
            ref = "- | -"
            if name.startswith("token stats"):  # against the default mean: torch's x.float().sum
                t_ref = bench(lambda: token_mean(x, 0))
                ref = f"{t_ref:.3f} (torch.sum mean) | {t_ref / t:.1f}x"
            elif not name.startswith("amax"):
                with backend.reference_only():
                    t_ref = host_bench(fn)
                ref = f"{t_ref:.3f} | {t_ref / t:.1f}x"
            gbps = nbytes / t / 1e6
            print(f"| {name} | {rows}x{cols} | {t:.4f} | {gbps:.0f} | {100 * gbps / copy:.0f}% "
                  f"| {ref} |")
        print(f"| copy (reference bandwidth) | {rows}x{cols} bf16 | {4 * n / copy / 1e6:.4f} "
              f"| {copy:.0f} | 100% | | |")


def one_pass_table(shapes):
    """The BF16 GEMM operand of an NVFP4 1x16 Averis residual (RNE) three ways: quantize, then
    dequantize the stored codes (two kernels); quantize writing the values in its pass and the
    payload too (an operand saved for backward and used now); and the values alone (an operand a
    GEMM reads at once). GB/s: the bytes each way must read and write."""
    title = "GEMM operand in one pass vs quantize then dequantize (nvfp4 1x16 rne, mean, BF16)"
    columns = ("path", "shape", "ms", "GB/s", "% of copy", "speed-up over two passes")
    for rows, cols, x, mean, amax, copy in _table(title, columns, shapes):
        n = rows * cols
        payload = n // 2 + n // 16  # codes two per byte, E4M3 scales per 16

        def quant(**kw):
            return quantize_nvfp4(x, amax=amax, subtract=mean, **kw)

        paths = [
            ("quantize, then dequantize", lambda: quant().scaled_values(),
             2 * n + payload + payload + 2 * n),
            ("one pass: values + payload", lambda: quant(values=torch.bfloat16).scaled_values(),
             2 * n + payload + 2 * n),
            ("one pass: values only", lambda: quant(values=torch.bfloat16, payload=False)
             .scaled_values(), 2 * n + 2 * n),
        ]
        t_two = None
        for name, fn, nbytes in paths:
            t = bench(fn)
            t_two = t if t_two is None else t_two
            gbps = nbytes / t / 1e6
            print(f"| {name} | {rows}x{cols} | {t:.4f} | {gbps:.0f} | {100 * gbps / copy:.0f}% "
                  f"| {t_two / t:.2f}x |")


def tile_sweep(rows, cols):
    """Quantize-kernel throughput per tile (rows, columns, warps), to choose fp4.TILES."""
    print(f"\n## Tile sweep: nvfp4 1x16 SR with mean, {rows}x{cols} BF16 (GB/s)\n")
    configs = [(16, 64, 4), (16, 128, 4), (16, 256, 8), (32, 64, 4), (32, 128, 4), (32, 256, 8),
               (64, 32, 4), (64, 64, 4), (64, 64, 8), (64, 128, 8), (128, 32, 4), (128, 64, 8)]
    x = torch.randn(rows, cols, device=DEVICE, dtype=torch.bfloat16)
    xt_src = torch.randn(cols, rows, device=DEVICE, dtype=torch.bfloat16)
    mean = torch.zeros(1, cols, device=DEVICE)
    amax = x.abs().amax().float()
    n = rows * cols
    nbytes = 2 * n + n // 2 + n // 16
    print("| tile (rows, cols, warps) | row-major GB/s | transposed read GB/s |\n|---|---|---|")
    for tile in configs:
        kw = dict(amax_t=amax, tile=tile, sr_key=seed_key(1), sub=mean)
        t_r = bench(lambda: fp4.quantize(x, "nvfp4", (1, 16), **kw))
        t_t = bench(lambda: fp4.quantize(xt_src.t(), "nvfp4", (1, 16), **kw))
        print(f"| {tile} | {nbytes / t_r / 1e6:.0f} | {nbytes / t_t / 1e6:.0f} |")


def recipe_operands(recipe: str, gemm: str, x, w, g):
    """Closures quantizing the operands of one GEMM as the linear layer does (shared W
    quantization and shared means as in linear/function.py), and the BF16 reference GEMM.
    `averis-pairwise` is averis with the recipe field token_sum=pairwise. quant(now) builds the
    operands that the linear quantizes right before this GEMM with output `now` ("values" under
    fp4_gemm=dequant, "payload" for the fused GEMM: linear.operands.operand_output); those it
    saved in forward (dgrad's W, wgrad's X) keep the payload."""
    sr = dict(rounding="stochastic", sr_seed=7)
    order = dict(token_sum="pairwise" if recipe.endswith("pairwise") else "torch")
    averis = recipe.startswith("averis")
    wblock = (16, 16) if averis else (1, 16)
    if gemm == "fprop":
        def quant(now="payload"):
            return (quantize_operand(x, "nvfp4", mean_dim=0 if averis else None, output=now,
                                     **order),
                    # a 16x16 W is also saved (transposed) for dgrad: it keeps its payload
                    quantize_operand(w, "nvfp4", block=wblock,
                                     output="both" if averis and now == "values" else now))
        return quant, lambda: torch.mm(x, w.t())
    if gemm == "dgrad":
        def quant(now="payload"):
            gq = quantize_operand(g, "nvfp4", mean_dim=0 if averis else None, **order,
                                  output=now, **(sr if averis else {}))
            wq = (quantize_operand(w, "nvfp4", block=wblock).t() if averis
                  else quantize_operand(w.t(), "nvfp4", transposed=True))
            return gq, wq
        return quant, lambda: torch.mm(g, w)
    # wgrad: the means come from fprop/dgrad (shared), so they are not part of this GEMM's cost
    g_mean = quantize_operand(g, "nvfp4", mean_dim=0, **order).mean if averis else None
    x_mean = quantize_operand(x, "nvfp4", mean_dim=0, **order).mean if averis else None

    def quant(now="payload"):
        return (quantize_operand(g.t(), "nvfp4", mean_dim=1 if averis else None, mean=g_mean,
                                 transposed=True, output=now, **(sr if averis else {})),
                quantize_operand(x.t(), "nvfp4", mean_dim=1 if averis else None, mean=x_mean,
                                 transposed=True))
    return quant, lambda: torch.mm(g.t(), x)


def gemm_table(tokens: int, recipes, modes):
    print(f"\n## Quantize + FP4 GEMM over BF16 GEMM ({tokens} tokens)\n")
    cols = [f"{r} {m}" for r in recipes for m in modes]
    print("| model | linear | gemm | bf16 ms | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    gemm_only = []
    for model, m in MODELS.items():
        for name, k, n in layer_linears(m):
            x = torch.randn(tokens, k, device=DEVICE, dtype=torch.bfloat16) + 2
            w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5
            g = torch.randn(tokens, n, device=DEVICE, dtype=torch.bfloat16) * 1e-3
            for gemm in ("fprop", "dgrad", "wgrad"):
                ratios = []
                for recipe in recipes:
                    quant, bf16 = recipe_operands(recipe, gemm, x, w, g)
                    t_bf16 = bench(bf16)
                    for mode in modes:
                        now = "values" if mode == "dequant" else "payload"
                        t = bench(lambda: qgemm(*quant(now), fp4_gemm=mode))
                        ratios.append(t / t_bf16)
                    if recipe == recipes[0]:
                        a, b = quant()
                        gemm_only.append((model, name, gemm, a, b, t_bf16))
                print(f"| {model} | {name} | {gemm} | {t_bf16:.3f} | "
                      + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return gemm_only


def gemm_only_table(cases):
    print("\n## GEMM alone: FP4 operands already quantized (ms; ratio to BF16 torch.mm)\n")
    print("| model | linear | gemm | bf16 mm | dequant + mm(out fp32) | fused Triton | mm(out fp32) on "
          "ready BF16 values |")
    print("|---|---|---|---|---|---|---|")
    for model, name, gemm, a, b, t_bf16 in cases:
        va, vb = a.values(), b.values()
        t_deq = bench(lambda: mm_fp32(a.values(), b.values()) * (a.scale() * b.scale()))
        fused = backend.fused_gemm_kernels(a.qt, b.qt, 0, "fused")
        t_fused = (bench(lambda: fused.scaled_mm(*_packed(a.qt), *_packed(b.qt), a.qt.fmt,
                                                 a.scale() * b.scale()))
                   if fused is not None else float("nan"))
        t_mm = bench(lambda: mm_fp32(va, vb))
        print(f"| {model} | {name} | {gemm} | {t_bf16:.3f} | {t_deq:.3f} ({t_deq / t_bf16:.2f}) "
              f"| {t_fused:.3f} ({t_fused / t_bf16:.2f}) | {t_mm:.3f} ({t_mm / t_bf16:.2f}) |")


def _packed(qt):
    """A QuantizedTensor as the kernels take it: codes, block scales, block."""
    return qt.data, qt.block_scales, qt.block


def gemm_tile_sweep(tokens: int):
    """Fused FP4 GEMM per tile, on Qwen3-0.6B fc1 fprop ([tokens x 1024] x [6144 x 1024]ᵀ)."""
    print(f"\n## Fused GEMM tile sweep: [{tokens} x 1024] x [6144 x 1024]ᵀ (ms)\n")
    x = torch.randn(tokens, 1024, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(6144, 1024, device=DEVICE, dtype=torch.bfloat16)
    a, b = quantize_nvfp4(x), quantize_nvfp4(w, (16, 16))
    s = a.tensor_scale * b.tensor_scale
    t_bf16 = bench(lambda: torch.mm(x, w.t()))
    print(f"| tile | ms | ratio to BF16 mm ({t_bf16:.3f} ms) |\n|---|---|---|")
    for bm, bn, bk, warps, stages in [(128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                      (64, 128, 128, 4, 3), (128, 64, 128, 4, 4)]:
        tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        try:
            t = bench(lambda: fp4.scaled_mm(*_packed(a), *_packed(b), a.fmt, s, tile=tile))
            print(f"| {tile} | {t:.3f} | {t / t_bf16:.2f} |")
        except Exception as e:  # e.g. out of shared memory for this tile: report, go on
            print(f"| {tile} | failed: {type(e).__name__} | |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--quick", action="store_true", help="one kernel shape, averis only")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: interpreter smoke test
    a = p.parse_args()
    global DEVICE
    DEVICE = a.device
    if backend.kernels_for(torch.empty(1, device=DEVICE)) is None:
        raise SystemExit("needs a CUDA device with Triton (and MEGATRON_AVERIS_KERNELS not 0)")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    print(f"# {name}, torch {torch.__version__}, triton {triton.__version__}")
    shapes = [(a.tokens, 1024)] if a.quick else [(a.tokens, 1024), (a.tokens, 3072), (a.tokens, 8192)]
    kernel_table(shapes)
    one_pass_table(shapes)
    if not a.quick:
        tile_sweep(a.tokens, 3072)
    # averis-pairwise: averis with token_sum=pairwise (fused stats pass for the mean)
    recipes = ["averis"] if a.quick else ["nvfp4-plain", "averis", "averis-pairwise"]
    # The emulation's GEMM paths; native / auto need the Transformer Engine route (te/native.py),
    # where qgemm gets the tensor-core product, so they are not timed here.
    cases = gemm_table(a.tokens, recipes, ("dequant", "fused"))
    gemm_only_table(cases)
    if not a.quick:
        gemm_tile_sweep(a.tokens)


if __name__ == "__main__":
    main()
