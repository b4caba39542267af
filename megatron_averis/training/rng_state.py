"""Seeding, and every random stream a resumed run must continue exactly.

A process draws from: Python's and NumPy's generators, torch's CPU generator, the CUDA generator,
megatron-core's tensor-parallel RNG tracker (dropout and initialisation inside model-parallel
regions), and the FP4 linears' stochastic-rounding streams, which are keyed by a per-layer call
counter (LinearContext.call_index; under the trainer the streams are also keyed by the iteration,
linear.sr_step, and the counter restarts every step). capture() and restore() cover all of them.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel


def seed_everything(seed: int, pipeline_rank: int) -> None:
    """Seed every generator. As in Megatron-LM, each pipeline stage offsets the seed by 100 x its
    rank, so that stages building different layers do not draw identical weights; megatron-core's
    tensor-parallel tracker further offsets by 2718 + TP rank for TP-split weights."""
    seed = seed + 100 * pipeline_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _linear_contexts(model_chunks):
    """(name, LinearContext) of every Averis linear, in a fixed order."""
    for i, chunk in enumerate(model_chunks):
        for name, module in chunk.named_modules():
            ctx = getattr(module, "linear_ctx", None)
            if ctx is not None and hasattr(ctx, "call_index"):
                yield f"{i}.{name}", ctx


def capture(model_chunks) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
        "sr_call_index": {name: ctx.call_index for name, ctx in _linear_contexts(model_chunks)},
    }


def restore(state: dict, model_chunks) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))
    counters = state["sr_call_index"]
    contexts = dict(_linear_contexts(model_chunks))
    if set(counters) != set(contexts):
        raise ValueError("the checkpoint's stochastic-rounding streams belong to different layers "
                         f"({len(counters)} saved, {len(contexts)} in this model); resume with the "
                         "same model and pipeline layout, or pass --no-load-rng")
    for name, ctx in contexts.items():
        ctx.call_index = counters[name]
