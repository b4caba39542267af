"""The gradient-fidelity records (tools/gradient_fidelity.py) and what is made of them: the JSONL
written as the run goes, CSV tables, a Markdown summary and the figures.

Records (one JSON object per line, field "record"):
  setup     once: the run's settings
  gradient  per iteration x recipe x scope (total, layer, linear, other): GRADIENT_FIELDS
  operand   per iteration x recipe x transformer-layer linear x operand (input, grad): OPERAND_FIELDS
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np

from megatron_averis.data.atomic import remove_quietly, temp_path
from megatron_averis.diagnostics.mean_bias import ORIENTATIONS
from megatron_averis.training.writers import read_records

LINEAR_ORDER = ("qkv", "proj", "fc1", "fc2")
# total: every parameter; layers: every transformer layer's (the total without embedding, output
# layer and final norm); layer: one transformer layer's; linear: one linear's weight in a layer;
# other: one parameter tensor outside the transformer layers.
SCOPES = ("total", "layers", "layer", "linear", "other")
QERR = ("qerr_nvfp4", "qerr_nvfp4_split", "qerr_nvfp4_rht", "qerr_nvfp4_split_rht")
OPERAND_STATS = ("mean_to_residual", "mean_energy_share") + tuple(
    f"{k}_{along}" for along in ORIENTATIONS for k in QERR)
GRADIENT_FIELDS = ("iteration", "recipe", "reference", "scope", "layer", "linear", "module",
                   "numel", "ref_norm", "norm", "rel_error", "cosine", "loss", "ref_loss")
OPERAND_FIELDS = ("iteration", "recipe", "layer", "linear", "module", "operand", "tokens",
                  "features") + OPERAND_STATS


# -- files -------------------------------------------------------------------------------------

def _atomic_write(path: str, write) -> None:
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    _atomic_write(path, write)


def _csv(records: list[dict], fields: tuple) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    return buf.getvalue()


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL written by this tool (or its .partial file of an interrupted run)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path!r}")
    records = read_records(path, kind="gradient_fidelity JSONL")
    if not any(r.get("record") == "gradient" for r in records):
        raise ValueError(f"{path} holds no gradient records; is it a gradient_fidelity JSONL?")
    return records


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _grad(records, **match) -> list[dict]:
    return [r for r in records if r.get("record") == "gradient"
            and all(r[k] == v for k, v in match.items())]


def _operand_recipe(records) -> str | None:
    """The recipe whose operand statistics the summary shows: bf16 when measured, else the first."""
    names = [r["recipe"] for r in records if r.get("record") == "operand"]
    return "bf16" if "bf16" in names else (names[0] if names else None)


def summary(records: list[dict], setup: dict) -> str:
    """Markdown: per iteration and recipe the whole-model figures and the linears' relative
    errors averaged over layers; the operand statistics of one recipe averaged over layers."""
    f = lambda v, d=4: "–" if v is None else f"{v:.{d}g}"  # noqa: E731
    lines = ["# Gradient fidelity", "",
             ", ".join(f"{k} {v}" for k, v in setup.items() if k != "record"), "",
             f"Against the {setup.get('reference', 'bf16')} gradient of the same weights and tokens. "
             "rel. error = ‖g − g_ref‖ / ‖g_ref‖; the linear columns are that of each linear's "
             "weight, averaged over the transformer layers.", "",
             "| iteration | recipe | loss | rel. error | cosine | layers: rel. error | worst layer | "
             + " | ".join(LINEAR_ORDER) + " |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | "
             + " | ".join("---:" for _ in LINEAR_ORDER) + " |"]
    for it in sorted({r["iteration"] for r in _grad(records)}):
        for name in dict.fromkeys(r["recipe"] for r in _grad(records, iteration=it)):
            total = _grad(records, iteration=it, recipe=name, scope="total")[0]
            decoder = _grad(records, iteration=it, recipe=name, scope="layers")[0]
            layers = [r for r in _grad(records, iteration=it, recipe=name, scope="layer")
                      if r["rel_error"] is not None]
            worst = max((r for r in layers if r["rel_error"] > 0), key=lambda r: r["rel_error"],
                        default=None)
            lin = [_mean(r["rel_error"] for r in _grad(records, iteration=it, recipe=name,
                                                        scope="linear", linear=x))
                   for x in LINEAR_ORDER]
            lines.append(f"| {it} | {name} | {total['loss']:.4f} | {f(total['rel_error'])} | "
                         f"{f(total['cosine'], 6)} | {f(decoder['rel_error'])} | "
                         + (f"{worst['layer']} ({worst['rel_error']:.3g})" if worst else "–")
                         + " | " + " | ".join(f(v, 3) for v in lin) + " |")
    shown = _operand_recipe(records)
    if shown:
        keys = ("mean_to_residual",) + tuple(f"{k}_{a}" for a in ORIENTATIONS for k in QERR[:2])
        lines += ["", f"Operands of the transformer layers' linears under {shown}, averaged over "
                  "layers: μ-to-residual ‖1μᵀ‖ / ‖R‖ and NVFP4 (RNE) relative error without / with "
                  "the mean split, in 1x16 blocks along features (fprop, dgrad) and along tokens "
                  "(wgrad).", "",
                  "| iteration | linear | operand | " + " | ".join(keys) + " |",
                  "| ---: | --- | --- | " + " | ".join("---:" for _ in keys) + " |"]
        ops = [r for r in records if r.get("record") == "operand" and r["recipe"] == shown]
        groups: dict = {}
        for r in ops:
            groups.setdefault((r["iteration"], r["operand"] != "input", r["linear"]), []).append(r)
        for (it, is_grad, lin) in sorted(groups, key=lambda k: (k[0], k[1], LINEAR_ORDER.index(k[2])
                                                               if k[2] in LINEAR_ORDER else 99)):
            rs = groups[(it, is_grad, lin)]
            lines.append(f"| {it} | {lin} | {'grad' if is_grad else 'input'} | "
                         + " | ".join(f(_mean(r[k] for r in rs)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(records) -> dict[str, str]:
    """A fixed colour per recipe, the same in every panel and figure."""
    return {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r["recipe"] for r in records))}


def _integer_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: str) -> None:
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _plt().close(fig)


def plot_layers(records: list[dict], path: str) -> None:
    """Relative gradient error per transformer layer, one line per recipe, a panel per iteration."""
    plt = _plt()
    iters = sorted({r["iteration"] for r in _grad(records)})
    cols = min(len(iters), 3)
    rows = math.ceil(len(iters) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    colors = _colors(records)
    for ax, it in zip(axes.flat, iters):
        for name in dict.fromkeys(r["recipe"] for r in _grad(records, iteration=it)):
            pts = sorted((r["layer"], r["rel_error"]) for r in
                         _grad(records, iteration=it, recipe=name, scope="layer")
                         if r["rel_error"] is not None and r["rel_error"] > 0)
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=name, color=colors[name])
        ax.set_yscale("log")
        _integer_axis(ax)
        ax.set_title(f"iteration {it}", fontsize=10)
        ax.set_xlabel("transformer layer")
        ax.set_ylabel("‖g − g_ref‖ / ‖g_ref‖")
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(iters):]:
        ax.axis("off")
    fig.suptitle(f"gradient error per layer against the {records[0].get('reference', 'bf16')} "
                 "gradient" if records else "")
    fig.tight_layout()
    _save(fig, path)


def plot_steps(records: list[dict], path: str) -> None:
    """Against the iteration: whole-model relative error and cosine per recipe, and the operands'
    μ-to-residual ratio (averaged over layers) of one recipe."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = _colors(_grad(records))
    for name, color in colors.items():
        for scope, style in (("total", "-"), ("layers", "--")):
            pts = sorted((r["iteration"], r["rel_error"], r["cosine"])
                         for r in _grad(records, recipe=name, scope=scope))
            err = [(p[0], p[1]) for p in pts if p[1]]  # an exact 0 (the reference) has no log
            label = name if scope == "total" else None
            if err:
                axes[0].plot(*zip(*err), marker="o", linestyle=style, label=label, color=color)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", linestyle=style,
                         label=label, color=color)
    axes[0].set_yscale("log")
    axes[0].set_title("‖g − g_ref‖ / ‖g_ref‖: whole model (—), transformer layers (- -)",
                      fontsize=10)
    axes[1].set_title("cosine(g, g_ref): whole model (—), transformer layers (- -)", fontsize=10)
    shown = _operand_recipe(records)
    ops = [r for r in records if r.get("record") == "operand" and r["recipe"] == shown]
    for lin in LINEAR_ORDER:
        for op, style in (("input", "-"), ("grad", "--")):
            sel = [r for r in ops if r["linear"] == lin and r["operand"] == op]
            its = sorted({r["iteration"] for r in sel})
            if its:
                axes[2].plot(its, [_mean(r["mean_to_residual"] for r in sel if r["iteration"] == i)
                                   for i in its], linestyle=style, marker="o", label=f"{lin} {op}")
    axes[2].set_title(f"μ-to-residual ‖1μᵀ‖/‖R‖, mean over layers ({shown})", fontsize=10)
    iters = sorted({r["iteration"] for r in _grad(records)})
    for ax in axes:
        if len(iters) <= 12:
            ax.set_xticks(iters)
        else:
            _integer_axis(ax)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def write_outputs(records: list[dict], out: str, plot: bool) -> list[str]:
    """OUT_gradients.csv, OUT_operands.csv, OUT.md and with `plot` OUT_layers.png (and
    OUT_steps.png for several iterations); returns the paths written."""
    setup = next((r for r in records if r.get("record") == "setup"), {})
    grads = [r for r in records if r.get("record") == "gradient"]
    ops = [r for r in records if r.get("record") == "operand"]
    written = [out + "_gradients.csv", out + "_operands.csv", out + ".md"]
    _write_text(written[0], _csv(grads, GRADIENT_FIELDS))
    _write_text(written[1], _csv(ops, OPERAND_FIELDS))
    _write_text(written[2], summary(records, setup))
    if plot:
        plot_layers(grads, out + "_layers.png")
        written.append(out + "_layers.png")
        if len({r["iteration"] for r in grads}) > 1:
            plot_steps(records, out + "_steps.png")
            written.append(out + "_steps.png")
    return written


class JsonlSink:
    """Records appended to OUT.jsonl.partial as each recipe finishes (an interrupted run keeps
    them; --from-jsonl reads them), renamed to OUT.jsonl once complete."""

    def __init__(self, out: str):
        self.path, self.partial = out + ".jsonl", out + ".jsonl.partial"
        self.records: list[dict] = []
        self._f = open(self.partial, "w", encoding="utf-8")

    def __call__(self, records: list[dict]) -> None:
        for r in records:
            self._f.write(json.dumps(r) + "\n")
        self._f.flush()
        self.records += records

    def commit(self) -> None:
        self._f.close()
        os.replace(self.partial, self.path)
