"""Kernel tests: every kernel result must equal the PyTorch reference bit for bit.

They run on CUDA (marked gpu) and, on a machine without a GPU, through Triton's interpreter on CPU
tensors when the session was started with TRITON_INTERPRET=1:

    TRITON_INTERPRET=1 python3 -m pytest -q tests/unit_tests/kernels
"""

import pytest
import torch

from megatron_averis import kernels
from megatron_averis.numerics import backend


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


@pytest.fixture
def reference():
    """A context manager that forces the PyTorch reference inside its block."""
    return backend.reference_only
