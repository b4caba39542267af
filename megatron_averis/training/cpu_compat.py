"""Run megatron-core's training machinery on a CPU-only machine (CI, tests). Inactive with CUDA.

megatron-core 0.16.1 assumes CUDA outside the model, too:
  - DDP's gradient buffers, the optimizers' found-inf / loss-scale tensors, grad-norm clipping and
    the pipeline schedules' token counters are created with device="cuda" or
    device=torch.cuda.current_device();
  - the mixed-precision and distributed optimizers sort parameters by their type() string
    ("torch.cuda.BFloat16Tensor", "torch.cuda.FloatTensor") and refuse anything else;
  - the tensor-parallel RNG tracker and activation recomputation save and restore the CUDA
    generator; p2p pipeline communication calls torch.cuda.synchronize().
(The model itself is covered by megatron_averis.megatron.cpu_compat, which keeps RoPE on CPU.)

`cpu_training()` makes these run on the CPU for the duration of a `with` block, and only when CUDA
is unavailable:
  - a TorchFunctionMode maps any CUDA device argument of a torch call to "cpu", makes
    Tensor.cuda() return the tensor itself, and answers Tensor.type() with the CUDA type name that
    megatron-core's checks expect (the dtype part is the tensor's own);
  - torch.cuda.current_device() answers "cpu", synchronize() does nothing, and the CUDA generator
    calls of megatron-core's RNG tracker act on torch's CPU generator (the one CPU kernels use).
Everything is restored on exit. Arithmetic is untouched: only where tensors live changes.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal (torch.cuda.current_device() style).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return func(*args, **kwargs)


def _cpu_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, *args, **kwargs):
    torch.set_rng_state(state)


@contextlib.contextmanager
def cpu_training():
    """Let megatron-core's DDP, optimizers, schedules and RNG tracker run on the CPU (no-op with CUDA)."""
    if torch.cuda.is_available():
        yield
        return
    import megatron.core.tensor_parallel.random as mcore_random

    patches = [
        (torch.cuda, "current_device", lambda: "cpu"),
        (torch.cuda, "synchronize", lambda *a, **k: None),
        (torch.cuda, "get_rng_state", _cpu_rng_state),
        (torch.cuda, "set_rng_state", _set_cpu_rng_state),
        (torch.cuda, "manual_seed", torch.manual_seed),
        (mcore_random, "_get_cuda_rng_state", _cpu_rng_state),
        (mcore_random, "_set_cuda_rng_state", _set_cpu_rng_state),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, replacement in patches:
        setattr(obj, name, replacement)
    try:
        with _CudaToCpu():
            yield
    finally:
        for obj, name, original in saved:
            setattr(obj, name, original)
