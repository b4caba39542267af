"""The CPU shim: CUDA device requests land on the CPU inside the block, nothing changes outside."""

import pytest
import torch

from megatron_averis.training.cpu_compat import cpu_training

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inactive with CUDA")


def test_cuda_requests_map_to_cpu_inside_only():
    original = torch.cuda.current_device
    with cpu_training():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.tensor([1.0], device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.empty(3, device=0).device.type == "cpu"
        t = torch.ones(2, dtype=torch.bfloat16)
        assert t.cuda() is t and t.to("cuda").device.type == "cpu"
        # megatron-core's optimizers sort parameters by these names.
        assert t.type() == "torch.cuda.BFloat16Tensor"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float32).dtype == torch.float32  # the conversion form is untouched
        torch.cuda.synchronize()
    assert torch.cuda.current_device is original
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    with cpu_training():
        tracker = CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 123)
        before = torch.get_rng_state()
        with tracker.fork():
            inside = torch.rand(4)
        # The default stream is untouched by the fork, and the forked stream advances.
        assert torch.equal(torch.get_rng_state(), before)
        with tracker.fork():
            assert not torch.equal(torch.rand(4), inside)
        # The tracked stream is the CPU generator seeded with 123.
        assert torch.equal(inside, torch.rand(4, generator=torch.Generator().manual_seed(123)))
