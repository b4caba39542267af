"""LinearContext: what the quantized linear needs besides tensors (recipe, TP/SP layout, seeds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_averis.linear.comm import SINGLE_DEVICE, TPComm
from megatron_averis.linear.sr_step import SR_STEP
from megatron_averis.numerics.hadamard import random_signs
from megatron_averis.numerics.operand import QuantizedOperand
from megatron_averis.numerics.random import StepSeed, mix_seed
from megatron_averis.recipes import OPERAND_ROLES, Recipe

MODES = ("none", "column", "row")


@dataclass
class LinearContext:
    """Everything the function needs besides tensors. One per module; `step()` per forward call.

    stream_id: identifies the layer in the stochastic-rounding stream (the same on all TP ranks).
        A seed mixes (recipe seed, stream_id, call_index, operand role, replica_id) and, once a
        training loop drives linear.sr_step.SR_STEP, the iteration from device memory; the call
        index then counts calls within the step.
    replica_id: the data(+context)-parallel rank: replicas see different tokens at the same local
        positions, so they must not share rounding bits (their noise would be correlated).
    gather_quantized: under SP, all-gather FP4 payloads (True) or BF16 tensors then quantize
        (False, the unquantized-communication baseline).
    accumulate_main_grad: add dW into weight.main_grad (FP32) as Megatron's
        gradient-accumulation fusion does, instead of returning it, whenever the weight has a
        main_grad (megatron-core's DDP gives it one); else dW is returned.
    out_stride: megatron-core's partition stride of a column-parallel weight: with stride s a
        rank holds s separate chunks of the output features (SwiGLU's fc1: s=2, [gate, up]).
        Needed to give each element its global position in the stochastic-rounding stream.
    observer: called as observer(role, operand) with each operand as it enters its GEMM (after
        any gather): for diagnostics and the TP-equivalence tests.
    """

    recipe: Recipe
    mode: str = "none"
    comm: TPComm = SINGLE_DEVICE
    sequence_parallel: bool = False
    gather_quantized: bool = True
    accumulate_main_grad: bool = False
    out_stride: int = 1
    stream_id: int = 0
    replica_id: int = 0
    call_index: int = 0
    step_epoch: int = 0
    signs: dict = field(default_factory=dict)
    observer: Callable[[str, QuantizedOperand], None] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.sequence_parallel and self.mode == "none":
            raise ValueError("sequence parallelism needs mode 'column' or 'row'")
        for gemm in ("fprop", "dgrad", "wgrad"):
            if self.recipe.rht(gemm):
                self.signs[gemm] = random_signs(self.recipe.rht_seed)

    def observe(self, **operands: QuantizedOperand) -> None:
        if self.observer is not None:
            for role, op in operands.items():
                self.observer(role, op)

    def out_positions(self, n_local: int):
        """Global output-feature index of this rank's first (or every) local output feature."""
        if self.mode != "column" or not self.comm.distributed:
            return 0
        if self.out_stride == 1:
            return self.comm.rank * n_local
        chunk = n_local // self.out_stride
        n_full = n_local * self.comm.world
        local = torch.arange(n_local)
        return (local // chunk) * (n_full // self.out_stride) + self.comm.rank * chunk + local % chunk

    def step(self) -> int:
        if self.step_epoch != SR_STEP.epoch:  # a new training step began
            self.step_epoch, self.call_index = SR_STEP.epoch, 0
        self.call_index += 1
        return self.call_index

    def seed(self, role: str, call_index: int, device: torch.device) -> int | StepSeed:
        base = mix_seed(self.recipe.sr_seed, self.stream_id, call_index,
                        OPERAND_ROLES.index(role), self.replica_id)
        step = SR_STEP.tensor(device)
        return base if step is None else StepSeed(base, step)
