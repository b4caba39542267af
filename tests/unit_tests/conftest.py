import os
import sys

import pytest
import torch

# Shared test helpers (fp4_reference.py, ...) live beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Run a numerics test on CPU, and on CUDA where there is a GPU."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _host_only_sr_seeds():
    """A test that runs a training step in-process switches the SR stream to device-resident
    steps (linear.sr_step); the next test starts from host-only seeds again."""
    yield
    from megatron_averis.linear.sr_step import SR_STEP

    SR_STEP.reset()
