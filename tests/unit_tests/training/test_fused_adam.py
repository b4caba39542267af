"""optim.fuse_torch_adam: megatron-core's torch AdamW fallback runs torch's fused kernel on CUDA."""

import pytest
import torch

from megatron_averis.training.optim import fuse_torch_adam, torch_adams


class _Wrapped:
    """What megatron-core's optimizers expose: the torch optimizer as `.optimizer`."""

    def __init__(self, inner):
        self.optimizer = inner


def _adam(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(257, 33, generator=g).to(device).requires_grad_(),
              torch.randn(4096, generator=g).to(device).requires_grad_()]
    return params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))


def _steps(params, adam, n=3):
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        adam.step()


def test_cpu_and_stepped_optimizers_are_left_alone():
    params, adam = _adam("cpu")
    fuse_torch_adam(_Wrapped(adam))
    assert not adam.param_groups[0]["fused"]
    assert torch_adams(_Wrapped(adam)) == [adam] and torch_adams(_Wrapped(object())) == []


@pytest.mark.gpu
def test_cuda_adam_is_fused_and_matches_the_foreach_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    params, adam = _adam("cuda")
    ref_params, ref = _adam("cuda")  # torch's default (foreach) AdamW, the same start
    fuse_torch_adam(_Wrapped(adam))
    assert adam.param_groups[0]["fused"] and not adam.param_groups[0]["foreach"]
    _steps(params, adam)
    _steps(ref_params, ref)
    assert not ref.param_groups[0]["fused"]
    assert all(s["step"].device.type == "cuda" for s in adam.state.values())
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    _, late = _adam("cuda")
    _steps(late.param_groups[0]["params"], late, 1)
    fuse_torch_adam(_Wrapped(late))  # has state from the foreach step: not switched
    assert not late.param_groups[0]["fused"]
