"""Full-iteration CUDA graph: the forward-backward schedule of one global batch, captured once
and replayed every step (--cuda-graph-impl local --cuda-graph-scope full_iteration, as in
Megatron-LM). The optimizer step, gradient zeroing and logging stay outside the graph.

Why: with emulated FP4 a layer issues dozens of small kernels per GEMM, and the Python that
launches them, not the GPU, sets the step time at moderate batch sizes. A replay issues the
whole schedule from one host call.

Why not megatron-core's FullCudaGraphWrapper: it keeps its graph and buffers in class attributes
(one training graph per process, while benchmarks/model_step.py builds many models) and requires
the graph-safe RNG tracker, whose generator states the checkpoints would have to special-case.
This model has no dropout, so nothing inside the step draws from torch's generators; the FP4
stochastic rounding reads its step from device memory (linear.sr_step).

Enabled by ExecutionConfig.cuda_graph (training.config). Requirements, all checked by
training.arguments: CUDA, no pipeline parallelism, no activation
recomputation, no --overlap-grad-reduce. megatron-core DDP's per-bucket NaN check (a host read)
is off in this mode (training.optim); a NaN still shows in the logged loss and grad norm. The
model and its DDP wrapper must be built on the stream the graph is captured on (side_stream
below): DDP registers gradient hooks on each parameter's gradient accumulator, and autograd would
otherwise make the default stream wait on the capture, which CUDA forbids.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads


def finalize_model_grads_capturable(model, num_tokens=None, **kwargs) -> None:
    """megatron-core's finalize_model_grads (DP reduction, SP/tied-embedding sums) followed by
    its 1 / tokens scaling, without its host read `if num_tokens > 0` (not capturable). No
    pipeline stages here (checked at start-up), so the token count needs no broadcast; a zero
    count leaves the (then zero) gradients unscaled, as megatron-core does."""
    finalize_model_grads(model, None, **kwargs)
    if num_tokens is None:
        return
    torch.distributed.all_reduce(
        num_tokens, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    scaling = 1.0 / num_tokens.clamp(min=1)
    for chunk in model:
        chunk.scale_gradients(scaling)


@contextlib.contextmanager
def side_stream(enabled: bool, device: torch.device):
    """Run the block on a new non-default stream (capture needs one), or as is."""
    if not enabled:
        yield
        return
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


class IterationGraph:
    """schedule(iterator over micro-batches) -> per-micro-batch loss records, run eagerly for
    `warmup_steps` calls (Triton compilation, cuBLAS plans, allocator), captured at the next call
    and replayed from then on. Micro-batches are copied into static device buffers first."""

    def __init__(self, schedule, num_microbatches: int, warmup_steps: int, device: torch.device):
        if warmup_steps < 1:
            raise ValueError("a CUDA graph needs >= 1 eager warm-up step before capture")
        self.schedule, self.n, self.warmup, self.device = schedule, num_microbatches, warmup_steps, device
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.buffers: list[dict] | None = None
        self.result = None

    def __call__(self, data_iterator):
        batches = [next(data_iterator) for _ in range(self.n)]
        self.calls += 1
        if self.calls <= self.warmup:
            return self.schedule(iter(batches))
        if self.graph is None:
            self._capture(batches)
        else:
            for buf, batch in zip(self.buffers, batches):
                for k, v in batch.items():
                    buf[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.result

    def _capture(self, batches) -> None:
        stream = torch.cuda.current_stream(self.device)
        if stream == torch.cuda.default_stream(self.device):
            raise RuntimeError("capture the iteration inside cuda_graph.side_stream(...), on the "
                               "stream the model and its DDP wrapper were built on")
        self.buffers = [{k: v.to(self.device, non_blocking=True).clone() for k, v in b.items()}
                        for b in batches]
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread may allocate pinned memory meanwhile.
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            self.result = self.schedule(iter(self.buffers))
