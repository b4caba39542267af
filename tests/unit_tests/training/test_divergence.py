"""The divergence guard's verdicts against numpy's median, its flags, and its state round trip."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_averis.training.divergence import DivergenceGuard, flag_problems


def guard_args(**over):
    base = dict(check_for_nan_in_loss_and_grad=True, check_for_spiky_loss=True,
                spiky_loss_factor=10.0, check_for_large_grads=True, large_grads_factor=5.0,
                divergence_window=4, divergence_action="skip", max_skipped_steps=2)
    return SimpleNamespace(**{**base, **over})


def test_nan_and_inf_are_divergence():
    guard = DivergenceGuard(guard_args())
    assert guard.assess(float("nan"), 1.0) == ["loss is nan"]
    assert guard.assess(3.0, float("inf")) == ["gradient norm is inf"]
    off = DivergenceGuard(guard_args(check_for_nan_in_loss_and_grad=False))
    assert off.assess(float("nan"), float("nan")) == []


def test_spikes_are_judged_against_the_median_of_the_window():
    guard = DivergenceGuard(guard_args())
    losses, norms = [7.0, 6.5, 6.0, 9.0, 5.5], [1.0, 2.0, 8.0, 1.5, 1.2]
    for loss, norm in zip(losses, norms):
        guard.healthy(loss, norm)
    window_loss, window_norm = np.median(losses[-4:]), np.median(norms[-4:])  # window 4
    assert guard.assess(10 * window_loss, 5 * window_norm) == []  # at the factor: healthy
    loss, norm = 10 * window_loss * (1 + 1e-9), 5 * window_norm * 1.01
    assert guard.assess(loss, norm) == [
        f"loss {loss:.6g} > 10 x {window_loss:.6g}, the median of the last 4 healthy steps",
        f"gradient norm {norm:.6g} > 5 x {window_norm:.6g}, the median of the last 4 healthy steps"]
    quiet = DivergenceGuard(guard_args(check_for_spiky_loss=False, check_for_large_grads=False))
    quiet.healthy(1.0, 1.0)
    assert quiet.assess(1e6, 1e6) == []
    assert DivergenceGuard(guard_args()).assess(1e6, 1e6) == []  # no history yet


def test_skip_policy_aborts_after_too_many_in_a_row():
    guard = DivergenceGuard(guard_args(max_skipped_steps=2))
    assert [guard.must_abort() for _ in range(3)] == [False, False, True]
    guard.healthy(1.0, 1.0)
    assert guard.must_abort() is False and guard.skipped_in_a_row == 1
    assert DivergenceGuard(guard_args(divergence_action="abort")).must_abort() is True


def test_state_round_trip():
    guard = DivergenceGuard(guard_args())
    for i in range(6):
        guard.healthy(float(i), float(i) / 2)
    guard.must_abort()
    restored = DivergenceGuard(guard_args())
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() == {
        "losses": [2.0, 3.0, 4.0, 5.0], "grad_norms": [1.0, 1.5, 2.0, 2.5], "skipped_in_a_row": 1}
    restored.load_state_dict(None)  # a checkpoint from before the guard: nothing to restore
    assert restored.state_dict() == guard.state_dict()


@pytest.mark.parametrize("over,problem", [
    ({"spiky_loss_factor": 1.0}, "--spiky-loss-factor must be > 1"),
    ({"large_grads_factor": math.nan}, "--large-grads-factor must be > 1"),
    ({"divergence_window": 0}, "--divergence-window must be >= 1, got 0"),
    ({"max_skipped_steps": 0}, "--max-skipped-steps must be >= 1, got 0"),
])
def test_flag_problems(over, problem):
    assert any(p.startswith(problem) for p in flag_problems(guard_args(**over)))
    assert flag_problems(guard_args()) == []
