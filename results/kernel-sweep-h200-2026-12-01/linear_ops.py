"""aten ops of one quantized linear's forward + backward, grouped by input shapes, GPU time."""
import sys
import torch
from torch.profiler import ProfilerActivity, profile
from megatron_averis.linear.module import QuantizedLinear
T, K, N = 8192, 2048, 11264
for recipe in sys.argv[1:]:
    torch.manual_seed(0)
    lin = QuantizedLinear(K, N, bias=False, recipe=recipe, device="cuda")
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        lin(x).backward(g)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(3):
            lin(x).backward(g)
        torch.cuda.synchronize()
    print(f"\n## {recipe}: {T}x{K} -> {N}, 3 forward+backward")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_device_time_total", row_limit=45, max_name_column_width=40,
        max_shapes_column_width=70))
