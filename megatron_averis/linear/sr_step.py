"""The training step in the stochastic-rounding stream, kept in device memory.

Without it, a linear's SR seed mixes (base seed, layer, call counter, operand role, replica) on
the host. A CUDA graph captured from one step would bake those ints in and replay the same bits at
every step. Once a training loop calls begin_step(iteration) before each step, every seed also
mixes in that iteration, read by the quantization kernels from a one-element device tensor that
begin_step updates in place, and each layer's call counter restarts at every step. The bits then
depend only on (iteration, call within the step), so eager and graphed runs, and a run resumed at
any step, draw the same bits.
"""

from __future__ import annotations

import torch


class StepCounter:
    """Process-wide: the iteration the SR stream is at, one tensor per device, and an epoch that
    tells LinearContexts a new step began."""

    def __init__(self):
        self.iteration: int | None = None  # None: no loop drives steps (host-only seeds)
        self.epoch = 0
        self._tensors: dict[torch.device, torch.Tensor] = {}

    def begin_step(self, iteration: int) -> None:
        """Call outside any CUDA graph capture, before the step's first forward."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        self.iteration = iteration
        self.epoch += 1
        for t in self._tensors.values():
            t.fill_(iteration)

    def tensor(self, device: torch.device) -> torch.Tensor | None:
        """The iteration as a one-element int64 tensor on `device`; None without begin_step."""
        if self.iteration is None:
            return None
        t = self._tensors.get(device)
        if t is None:
            t = torch.full((1,), self.iteration, dtype=torch.int64, device=device)
            self._tensors[device] = t
        return t

    def reset(self) -> None:
        """Back to host-only seeds (a process that trains several models, e.g. a benchmark)."""
        self.__init__()


SR_STEP = StepCounter()
