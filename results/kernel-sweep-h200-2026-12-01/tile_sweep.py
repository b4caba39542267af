"""GPU-bound tile sweep (CUDA-graph timing) of the quantize kernels at the models' shapes: main's
fp4.quantize (rows / transposed, RNE / SR, values / payload) and the branch's quantize_both."""
import importlib.util, json, sys, time
import torch
from megatron_averis.kernels import fp4
spec = importlib.util.spec_from_file_location("fp4_both", ".devrun/fp4_both.py")
fb = importlib.util.module_from_spec(spec); sys.modules["fp4_both"] = fb; spec.loader.exec_module(fb)
dev = "cuda" if torch.cuda.is_available() else "cpu"
T = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
CS = [int(c) for c in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1024, 2048, 3072, 4096, 5632, 6144, 11264]
TILES = [(32, 64, 4), (64, 64, 4), (32, 32, 2), (32, 32, 4), (64, 32, 4), (64, 128, 8), (128, 64, 8), (32, 128, 4)]
BOTH_TILES = [(64, 64, 4), (32, 32, 2), (32, 64, 4), (64, 32, 4), (32, 32, 4), (128, 32, 4)]
step = torch.zeros((), dtype=torch.int64, device=dev)

def gpu_ms(fn, n=20):
    fn(); fn()
    if dev != "cuda":
        t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 1e9
    for _ in range(3):
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / n)
    return best

out = open(sys.argv[1], "w")
def rec(**r):
    out.write(json.dumps(r) + "\n"); out.flush()
for C in CS:
    x = torch.randn(T, C, device=dev, dtype=torch.bfloat16) + 0.5
    xt = x.t()
    mu = x.float().mean(0, keepdim=True)           # [1, C]
    amax = (x.float() - mu).abs().amax()
    y = torch.empty_like(x)
    copy = gpu_ms(lambda: y.copy_(x))
    rec(shape=[T, C], case="copy", ms=copy)
    cases = {
        "rows rne mean values": (x, dict(sub=mu, values=torch.bfloat16, payload=False)),
        "rows sr mean values": (x, dict(sub=mu, values=torch.bfloat16, payload=False, sr_key=5, sr_step=step)),
        "T rne mean payload": (xt, dict(sub=mu.t(), payload=True)),
        "T sr mean values": (xt, dict(sub=mu.t(), values=torch.bfloat16, payload=False, sr_key=6, sr_step=step)),
    }
    for name, (inp, kw) in cases.items():
        for tile in TILES:
            try:
                ms = gpu_ms(lambda: fp4.quantize(inp, "nvfp4", (1, 16), amax_t=amax, tile=tile, **kw))
                rec(shape=[T, C], case=name, tile=tile, ms=ms, copy_share=copy / ms)
            except Exception as e:
                rec(shape=[T, C], case=name, tile=tile, error=f"{type(e).__name__}: {str(e)[:150]}")
    both = {
        "both fwd (rw values, cw payload) rne": (fb.Orientation(values=torch.bfloat16, payload=False),
                                                  fb.Orientation(values=None, payload=True)),
        "both bwd (values, values) sr": (fb.Orientation(values=torch.bfloat16, payload=False, sr_key=5, sr_step=step),
                                          fb.Orientation(values=torch.bfloat16, payload=False, sr_key=6, sr_step=step)),
    }
    for name, (rw, cw) in both.items():
        for tile in BOTH_TILES:
            try:
                ms = gpu_ms(lambda: fb.quantize_both(x, rw, cw, amax_t=amax, sub=mu, tile=tile))
                rec(shape=[T, C], case=name, tile=tile, ms=ms, copy_share=copy / ms)
            except Exception as e:
                rec(shape=[T, C], case=name, tile=tile, error=f"{type(e).__name__}: {str(e)[:150]}")
    print("done", C, flush=True)
