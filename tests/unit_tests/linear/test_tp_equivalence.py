"""TP=2/4 + sequence parallelism reproduces the single-device quantized linear (gloo on CPU)."""

import pytest
import torch

from megatron_averis.linear import SINGLE_DEVICE
from tp_cases import reference_slices, run_linear, tp_worker
from tp_harness import run_world

CASES = [(r, m, gq) for r in ("averis", "nvfp4", "averis-paper") for m in ("column", "row") for gq in (True, False)]
# Stated tolerance: outputs and gradients within 2e-5 x max|ref| (split-K partial sums add in a
# different order); quantized operands identical except elements whose reference value sits within
# an FP32 ulp of a rounding boundary: at most 0.1% of an operand.
OUT_TOL = 2e-5
MAX_BOUNDARY_FRACTION = 1e-3
# averis-paper keeps μ in FP32: the all-reduced partial sums give μ to within a few FP32 ulps of
# the single-device sum (summation order), so every element of μ + R̂ may move by that much.
OPERAND_RTOL = {"averis-paper": 1e-6}


def compare(results, world, device="cpu"):
    report = {}
    for (recipe, mode, gq) in CASES:
        ref = run_linear(recipe, "none", SINGLE_DEVICE, lambda *t: t, torch.device(device))
        for rank, res in enumerate(results):
            got = res[(recipe, mode, gq)]
            sl = reference_slices(mode, rank, world)
            for key in ("y", "dx", "dw"):
                want = ref[key][sl[key]]
                err = (got[key] - want).abs().max().item()
                assert err <= OUT_TOL * want.abs().max().item(), (recipe, mode, gq, rank, key, err)
            for role, op in got["ops"].items():
                want = ref["ops"][role][sl[role]]
                assert op.shape == want.shape, (role, op.shape, want.shape)
                tol = OPERAND_RTOL.get(recipe, 0.0) * want.abs().max().item()
                mism = ((op - want).abs() > tol).sum().item()
                report[(recipe, mode, gq, rank, role)] = mism
                assert mism <= MAX_BOUNDARY_FRACTION * want.numel(), (recipe, mode, gq, rank, role, mism)
    return report


@pytest.mark.parametrize("world", [2, 4])
def test_tp_sp_matches_single_device_gloo(world):
    results = run_world(world, tp_worker, CASES, "cpu")
    report = compare(results, world)
    print(f"world {world}: operand elements differing from TP=1: {sum(report.values())} "
          f"over {len(report)} operand shards")


@pytest.mark.gpu
def test_tp2_sp_matches_single_device_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results = run_world(2, tp_worker, CASES, "cuda", backend="nccl")
    report = compare(results, 2, device="cuda")
    print(f"NCCL world 2: operand elements differing from TP=1: {sum(report.values())} "
          f"over {len(report)} operand shards")
