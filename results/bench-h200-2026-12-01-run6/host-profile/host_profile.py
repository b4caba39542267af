"""Host time of one quantized linear fwd+bwd (small shape, GPU idle), cProfile hot spots,
launch counts, and the bare launch cost of one Triton kernel vs one torch op."""
import cProfile, pstats, io, time, json, os, sys
import torch
from megatron_averis.linear import QuantizedLinear
from megatron_averis.recipes import get_recipe
from megatron_averis.kernels import fp4

out = os.environ.get("OUT", ".")
dev = torch.device("cuda")
T, K, N = 1024, 1024, 1024
x = torch.randn(T, K, device=dev, dtype=torch.bfloat16)
gy = torch.randn(T, N, device=dev, dtype=torch.bfloat16)
res = {}
for recipe in ["bf16", "nvfp4-nohadamard", "averis", "nvfp4"]:
    layer = QuantizedLinear(K, N, bias=False, recipe=get_recipe(recipe), device=dev)
    xi = x.clone().requires_grad_()
    def step():
        layer(xi).backward(gy)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(); torch.cuda.synchronize()
    ev = prof.key_averages()
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    res[recipe] = dict(host_ms=host, wall_ms=wall, launches=launches)
    print(recipe, res[recipe], flush=True)
    if recipe in ("averis", "nvfp4-nohadamard"):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            step()
        pr.disable()
        torch.cuda.synchronize()
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats(key).print_stats(60)
            txt = s.getvalue().replace(os.environ.get("SITE", "<none>"), "<site>").replace(os.getcwd(), "<repo>")
            txt = txt.replace("/opt/torch/.venv/lib/python3.12/site-packages", "<site-packages>")
            open(f"{out}/cprofile-{recipe}-{key}.txt", "w").write(txt)
        s = io.StringIO()
        s.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=60))
        open(f"{out}/torchprof-{recipe}.txt", "w").write(s.getvalue())
# bare launch costs
y = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
def bench(f, n=2000):
    for _ in range(20): f()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): f()
    h = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize(); return h
res["launch_us"] = dict(
    torch_add=bench(lambda: y.add(1)),
    fp4_amax=bench(lambda: fp4.amax(y)),
    fp4_quantize=bench(lambda: fp4.quantize(y, "nvfp4", (1, 16))),
)
print(res["launch_us"])
json.dump(res, open(f"{out}/host_profile.json", "w"), indent=1)
