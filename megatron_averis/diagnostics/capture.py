"""Mean-bias statistics of every linear layer's input (and output gradient) in a GPTModel.

Hooks on megatron-core's ColumnParallelLinear / RowParallelLinear (the Averis subclasses, the BF16
edge layers and the output layer alike): a forward pre-hook sees the input X [s, b, in], a hook on
the output tensor sees the gradient G [s, b, out] in backward. Each is reduced to its statistics
(mean_bias.mean_bias_report over [tokens, features]) inside the hook, so no activation is kept.
"""

from __future__ import annotations

import re

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
    "input"), and with grads=True each backward adds one for its output gradient ("grad")."""

    def __init__(self, model: torch.nn.Module, *, grads: bool = False, topk_fraction: float = 1e-3,
                 mean_format: str = "bf16", rht_seed: int = 0):
        self.model, self.grads = model, grads
        self.kw = dict(topk_fraction=topk_fraction, mean_format=mean_format, rht_seed=rht_seed)
        self.rows: list[dict] = []
        self._handles = []

    def _row(self, name: str, operand: str, t: torch.Tensor) -> None:
        x = t.detach().reshape(-1, t.shape[-1])
        layer, linear = describe(name)
        self.rows.append({"module": name, "layer": layer, "linear": linear, "operand": operand,
                          "tokens": x.shape[0], "features": x.shape[1],
                          **mean_bias_report(x, **self.kw)})

    def __enter__(self):
        for name, mod in linear_modules(self.model):
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


def run_batch(model, tokens: torch.Tensor, *, grads: bool, **kw) -> list[dict]:
    """Statistics rows of one batch tokens [b, s + 1] (inputs tokens[:, :-1], labels
    tokens[:, 1:]); with grads, the backward pass of the mean token loss."""
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with LinearStatsCapture(model, grads=grads, **kw) as cap:
        if grads:
            model.zero_grad(set_to_none=True)
            model(ids, pos, None, labels=labels).float().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(ids, pos, None)
    return cap.rows
