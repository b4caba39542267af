"""Divergence guard: a NaN/Inf loss or gradient norm, or a spike over the running median of the
recent healthy steps, either aborts the run without saving or drops the step's update.

Flags follow Megatron-LM (--check-for-nan-in-loss-and-grad, --check-for-spiky-loss,
--check-for-large-grads) with the factors, window and action made explicit. The checks run
between the gradient norm and the parameter update (`guarded_step`), so a skipped step leaves
weights, optimizer state and LR schedule as the last healthy step left them. Loss and gradient
norm are global (reduced over all ranks), so every rank reaches the same verdict without talking.
The medians' history travels in checkpoints, so a resumed run judges as the uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch

from megatron_averis.training.config import FaultToleranceConfig

ACTIONS = ("abort", "skip")
DEFAULT_LOSS_FACTOR = 10.0   # Megatron-LM's spiky-loss threshold
DEFAULT_GRAD_FACTOR = 10.0   # Megatron-LM's large-grads threshold
DEFAULT_WINDOW = 100
DEFAULT_MAX_SKIPS = 10
MIN_HISTORY = 1  # healthy steps before a spike can be judged: a blow-up often comes at step 2


class TrainingDiverged(RuntimeError):
    """The run was stopped by the divergence guard; nothing was saved after the last healthy step."""


def flag_problems(ft: FaultToleranceConfig) -> list[str]:
    problems = []
    for flag, value in (("--spiky-loss-factor", ft.spiky_loss_factor),
                        ("--large-grads-factor", ft.large_grads_factor)):
        if not value > 1:
            problems.append(f"{flag} must be > 1 (a multiple of the running median), got {value:g}")
    if ft.divergence_window < MIN_HISTORY:
        problems.append(f"--divergence-window must be >= {MIN_HISTORY}, got {ft.divergence_window}")
    if ft.max_skipped_steps < 1:
        problems.append(f"--max-skipped-steps must be >= 1, got {ft.max_skipped_steps}")
    return problems


class DivergenceGuard:
    def __init__(self, ft: FaultToleranceConfig):
        self.nan_check = ft.check_for_nan_in_loss_and_grad
        self.loss_factor = ft.spiky_loss_factor if ft.check_for_spiky_loss else None
        self.grad_factor = ft.large_grads_factor if ft.check_for_large_grads else None
        self.action = ft.divergence_action
        self.max_skips = ft.max_skipped_steps
        self.losses: deque[float] = deque(maxlen=ft.divergence_window)
        self.grad_norms: deque[float] = deque(maxlen=ft.divergence_window)
        self.skipped_in_a_row = 0

    def assess(self, loss: float, grad_norm: float | None) -> list[str]:
        """Why this step diverged (empty: healthy)."""
        reasons = []
        if self.nan_check:
            if not math.isfinite(loss):
                reasons.append(f"loss is {loss}")
            if grad_norm is not None and not math.isfinite(grad_norm):
                reasons.append(f"gradient norm is {grad_norm}")
        for name, value, history, factor in (("loss", loss, self.losses, self.loss_factor),
                                             ("gradient norm", grad_norm, self.grad_norms,
                                              self.grad_factor)):
            if factor is None or value is None or len(history) < MIN_HISTORY:
                continue
            median = statistics.median(history)
            if value > factor * median:  # NaN never is: the NaN check owns it
                reasons.append(f"{name} {value:.6g} > {factor:g} x {median:.6g}, the median of "
                               f"the last {len(history)} healthy steps")
        return reasons

    def healthy(self, loss: float, grad_norm: float | None) -> None:
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        self.skipped_in_a_row = 0

    def must_abort(self) -> bool:
        """After a diverged step: stop now (abort policy, or too many skips in a row)?"""
        self.skipped_in_a_row += 1
        return self.action == "abort" or self.skipped_in_a_row > self.max_skips

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint written before the guard existed
            return
        self.losses.extend(state["losses"])
        self.grad_norms.extend(state["grad_norms"])
        self.skipped_in_a_row = state["skipped_in_a_row"]


@torch.no_grad()
def guarded_step(optimizer, judge) -> tuple[bool, float | None, list[str]]:
    """megatron-core's optimizer step with `judge(grad_norm) -> reasons` between the gradient norm
    and the update: (updated, grad norm before clipping, reasons). The same operations as
    ChainedOptimizer.step (prepare, norm, clip by that norm, step), so a healthy run is unchanged."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # inf/NaN under FP16 loss scaling: megatron-core skips the step
        return False, None, []
    grad_norm = optimizer.get_grad_norm()
    reasons = judge(grad_norm)
    if reasons:
        return False, grad_norm, reasons
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if opt.config.clip_grad > 0 and params:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads(), grad_norm, []
