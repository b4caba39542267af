"""Kernel tests: every kernel result must equal the PyTorch reference bit for bit.

They run on CUDA (marked gpu) and, on a machine without a GPU, through Triton's interpreter on CPU
tensors when the session was started with TRITON_INTERPRET=1:

    TRITON_INTERPRET=1 python3 -m pytest -q tests/unit_tests/kernels
"""

import contextlib
import os

import pytest
import torch

from megatron_averis import kernels


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "cpu-interpreter"])
def kdev(request):
    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    if request.param == "cuda":
        if kernels.interpreting():
            pytest.skip("TRITON_INTERPRET=1: the CUDA variant runs without the interpreter")
        return torch.device("cuda")
    if not kernels.interpreting():
        pytest.skip("set TRITON_INTERPRET=1 to run the kernels through Triton's interpreter on CPU")
    return torch.device("cpu")


@contextlib.contextmanager
def reference_numerics():
    """Force the PyTorch reference inside the block (MEGATRON_AVERIS_KERNELS=0)."""
    old = os.environ.get(kernels.ENV_SWITCH)
    os.environ[kernels.ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[kernels.ENV_SWITCH]
        else:
            os.environ[kernels.ENV_SWITCH] = old


@pytest.fixture
def reference():
    return reference_numerics
