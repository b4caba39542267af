"""Fixtures for megatron-core tests in one CPU process."""

import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # test_model's helpers


@pytest.fixture(scope="module")
def mcore_single_process(tmp_path_factory):
    """torch.distributed (gloo, world size 1, file rendezvous: no port to collide on) and
    megatron-core's parallel_state with every parallel size 1. Only what this fixture set up is
    torn down. Weights are initialised on the CPU (use_cpu_initialization=True) from torch's
    default generator, so torch.manual_seed stands in for model_parallel_cuda_manual_seed."""
    from megatron.core import parallel_state

    created_group = not dist.is_initialized()
    if created_group:
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError("mcore_single_process needs a world size of 1")
    created_state = not parallel_state.model_parallel_is_initialized()
    if created_state:
        parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(1234)
    yield
    if created_state:
        parallel_state.destroy_model_parallel()
    if created_group:
        dist.destroy_process_group()
