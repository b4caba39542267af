"""Mean-bias statistics of every linear layer's input (and output gradient) in a GPTModel.

Hooks on megatron-core's ColumnParallelLinear / RowParallelLinear (the Averis subclasses, the BF16
edge layers and the output layer alike): a forward pre-hook sees the input X [s, b, in], a hook on
the output tensor sees the gradient G [s, b, out] in backward. Each is reduced to its statistics
(mean_bias.mean_bias_report over [tokens, features]) inside the hook, so no activation is kept.
"""

from __future__ import annotations

import functools
import re
from typing import Callable

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_averis.diagnostics.mean_bias import mean_bias_report

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
# Short names of the GPT layer's linears, for tables and plots.
SHORT = {"self_attention.linear_qkv": "qkv", "self_attention.linear_proj": "proj",
         "mlp.linear_fc1": "fc1", "mlp.linear_fc2": "fc2", "output_layer": "lm_head"}


def describe(name: str) -> tuple[int | None, str]:
    """(transformer layer index or None, short linear name) of a module name."""
    m = _LAYER.search(name)
    if m:
        return int(m.group(1)), SHORT.get(m.group(2), m.group(2))
    return None, SHORT.get(name, name)


def linear_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    mods = [(n, m) for n, m in model.named_modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    if not mods:
        raise ValueError("the model has no megatron-core linear layers to capture")
    return mods


class LinearStatsCapture:
    """Context manager: while active, each forward through a linear layer adds a row (operand
    "input"), and with grads=True each backward adds one for its output gradient ("grad").

    report: operand [tokens, features] -> dict of statistics (default: mean_bias_report with the
    keyword arguments). select: which linears, by module name (default: all).
    """

    def __init__(self, model: torch.nn.Module, *, grads: bool = False,
                 report: Callable[[torch.Tensor], dict] | None = None,
                 select: Callable[[str], bool] | None = None, **kw):
        if report is not None and kw:
            raise TypeError(f"{sorted(kw)} configure the default report; pass them to `report`")
        self.model, self.grads, self.select = model, grads, select
        self.report = report or functools.partial(mean_bias_report, **kw)
        self.rows: list[dict] = []
        self._handles = []

    def _row(self, name: str, operand: str, t: torch.Tensor) -> None:
        x = t.detach().reshape(-1, t.shape[-1])
        layer, linear = describe(name)
        self.rows.append({"module": name, "layer": layer, "linear": linear, "operand": operand,
                          "tokens": x.shape[0], "features": x.shape[1],
                          **self.report(x)})

    def __enter__(self):
        for name, mod in linear_modules(self.model):
            if self.select is not None and not self.select(name):
                continue
            def pre(module, args, name=name):
                self._row(name, "input", args[0])

            self._handles.append(mod.register_forward_pre_hook(pre))
            if self.grads:
                def post(module, args, output, name=name):
                    out = output[0] if isinstance(output, tuple) else output
                    if out.requires_grad:
                        out.register_hook(lambda g: self._row(name, "grad", g))

                self._handles.append(mod.register_forward_hook(post))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def model_inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, positions 0..s-1, labels) of a batch tokens [b, s + 1], as the trainer feeds a
    sample without document resets."""
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    return ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids), labels


def backward_mean_loss(model, tokens: torch.Tensor) -> float:
    """Forward and backward of the mean token loss of tokens [b, s + 1] (causal mask, no padding):
    the trainer's loss for one batch. Gradients accumulate into .grad; returns the loss."""
    ids, pos, labels = model_inputs(tokens)
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    return float(loss.detach())


def run_batch(model, tokens: torch.Tensor, *, grads: bool, **kw) -> list[dict]:
    """Statistics rows of one batch tokens [b, s + 1]; with grads, the backward pass of the mean
    token loss."""
    with LinearStatsCapture(model, grads=grads, **kw) as cap:
        if grads:
            model.zero_grad(set_to_none=True)
            backward_mean_loss(model, tokens)
            model.zero_grad(set_to_none=True)
        else:
            ids, pos, _ = model_inputs(tokens)
            with torch.no_grad():
                model(ids, pos, None)
    return cap.rows
