"""Mean-bias analysis of checkpoints: per-linear-layer statistics (mean_bias.METRICS) of the inputs
(and optionally the output gradients) on one batch, as CSV, a heat map over layers, and their
course over a run's checkpoints. Command line: tools/analyze_mean_bias.py."""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import numpy as np
import torch

from megatron_averis.diagnostics import checkpoint as ckpt
from megatron_averis.diagnostics.batch import batch_tokens, data_prefix
from megatron_averis.diagnostics.capture import run_batch
from megatron_averis.diagnostics.compare import require_matplotlib
from megatron_averis.diagnostics.mean_bias import METRICS

HEATMAP_METRICS = ("mean_to_residual", "mean_energy_share", "topk_mean_share", "cos_mean_top_sv",
                   "qerr_nvfp4", "qerr_nvfp4_split", "dyn_range", "dyn_range_split")
TRAINING_METRICS = ("mean_to_residual", "topk_mean_share", "cos_mean_top_sv", "split_error_ratio")
COLUMNS = ("step", "module", "layer", "linear", "operand", "tokens", "features") + METRICS


def analyze(infos: list, tokens: torch.Tensor, *, grads: bool, recipe, device, **kw) -> list[dict]:
    rows = []
    for info in infos:
        model = ckpt.load_model(info, recipe=recipe, device=device)
        for r in run_batch(model, tokens.to(device), grads=grads, **kw):
            rows.append({"step": info.iteration, **r})
        del model
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})


def _value(r: dict, metric: str) -> float:
    if metric == "split_error_ratio":  # error with the split / without
        return r["qerr_nvfp4_split"] / r["qerr_nvfp4"] if r["qerr_nvfp4"] else math.nan
    return r[metric]


_LINEAR_ORDER = ("qkv", "proj", "fc1", "fc2")
# Panels drawn on one colour scale, so that the two can be compared cell for cell.
_SHARED_SCALE = (("qerr_nvfp4", "qerr_nvfp4_split", "qerr_nvfp4_rht", "qerr_nvfp4_split_rht"),
                 ("dyn_range", "dyn_range_split"))


def _series(rows: list[dict]) -> list[tuple[str, str]]:
    """(linear, operand) pairs of the transformer layers: inputs, then gradients, each in the
    layer's forward order."""
    pairs = {(r["linear"], r["operand"]) for r in rows if r["layer"] is not None}

    def key(p):
        lin, op = p
        return (op != "input", _LINEAR_ORDER.index(lin) if lin in _LINEAR_ORDER else 99, lin)

    return sorted(pairs, key=key)


def heatmap(rows: list[dict], path: str, title: str, metrics=HEATMAP_METRICS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows)
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    if not series:
        raise ValueError("no transformer-layer rows to draw")
    cols = 4
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 0.45 * len(series) * nrows + 1.6 * nrows),
                             squeeze=False)
    grids = {}
    for metric in metrics:
        grid = np.full((len(series), len(layers)), np.nan)
        for r in rows:
            if r["layer"] is not None:
                grid[series.index((r["linear"], r["operand"])), layers.index(r["layer"])] = _value(r, metric)
        grids[metric] = grid
    for ax, metric in zip(axes.flat, metrics):
        grid = grids[metric]
        shared = next((g for g in _SHARED_SCALE if metric in g), (metric,))
        both = np.concatenate([grids[m].ravel() for m in shared if m in grids])
        vmin, vmax = np.nanmin(both), np.nanmax(both)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest",
                       vmin=vmin, vmax=vmax)
        ax.set_title(metric, fontsize=10)
        ax.set_yticks(range(len(series)), [f"{a} {b}" for a, b in series], fontsize=8)
        ax.set_xticks(range(len(layers)), layers, fontsize=8)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if grid.size <= 96:
            mid = (vmin + vmax) / 2
            for (i, j), v in np.ndenumerate(grid):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                            color="black" if v > mid else "white")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_plot(rows: list[dict], path: str, title: str, metrics=TRAINING_METRICS) -> None:
    """Each metric averaged over the transformer layers, against the checkpoint step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["step"] for r in rows})
    series = _series(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for lin, op in series:
            ys = [np.nanmean([_value(r, metric) for r in rows if r["step"] == s and
                              r["linear"] == lin and r["operand"] == op and r["layer"] is not None])
                  for s in steps]
            ax.plot(steps, ys, marker="o", linestyle="-" if op == "input" else "--",
                    label=f"{lin} {op}")
        ax.set_title(metric + (" (qerr split / plain)" if metric == "split_error_ratio" else ""),
                     fontsize=10)
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title + " — mean over layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> str:
    """Markdown: per step, linear and operand, the statistics averaged over layers."""
    keys = ("mean_to_residual", "topk_mean_share", "cos_mean_top_sv", "qerr_nvfp4",
            "qerr_nvfp4_split", "qerr_nvfp4_split_rht", "dyn_range", "dyn_range_split")
    lines = ["| step | linear | operand | " + " | ".join(keys) + " |",
             "| ---: | --- | --- | " + " | ".join("---:" for _ in keys) + " |"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["step"], r["linear"], r["operand"]), []).append(r)
    for (step, lin, op), rs in groups.items():
        vals = [float(np.mean([x[k] for x in rs])) for k in keys]
        lines.append(f"| {step} | {lin} | {op} | " + " | ".join(f"{v:.4g}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/analyze_mean_bias.py",
        description="Per-linear-layer mean-bias statistics of a checkpoint (or of all checkpoints "
                    "of a run) on one batch: CSV, heat map over layers, course over training.")
    p.add_argument("--load", required=True,
                   help="the trainer's --save directory, or one iter_* checkpoint directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ckpt-step", type=int, nargs="+", default=None,
                   help="these iterations (default: the latest)")
    g.add_argument("--all-checkpoints", action="store_true", help="every checkpoint in --load")
    p.add_argument("--data-prefix", default=None,
                   help="indexed dataset to take the batch from (default: the run's validation data)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's micro-batch")
    p.add_argument("--seq-length", type=int, default=None, help="default: the run's")
    p.add_argument("--grads", action="store_true",
                   help="also the output gradients (backward pass of the mean token loss)")
    p.add_argument("--recipe", default=None,
                   help="GEMM recipe to run the model under (default: the one it was trained with)")
    p.add_argument("--topk-fraction", type=float, default=1e-3,
                   help="top-k share over this fraction of the largest |x|")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="mean_bias", help="output prefix: OUT.csv, OUT_heatmap.png, "
                                                      "OUT_training.png (several checkpoints), OUT.md")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        device = ckpt.resolve_device(a.device)
        require_matplotlib()
        with ckpt.single_process():
            if a.all_checkpoints:
                infos = ckpt.list_checkpoints(a.load)
            else:
                infos = [ckpt.find(a.load, s) for s in (a.ckpt_step or [None])]
            cfg = infos[-1].config
            tokens = batch_tokens(a.data_prefix or data_prefix(cfg),
                                  a.batch_size or cfg["micro_batch_size"],
                                  a.seq_length or cfg["seq_length"])
            rows = analyze(infos, tokens, grads=a.grads, recipe=a.recipe, device=device,
                           topk_fraction=a.topk_fraction)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"analyze_mean_bias: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_csv(rows, a.out + ".csv")
    name = cfg.get("run_name", os.path.basename(os.path.abspath(a.load)))
    recipe = a.recipe or cfg["recipe"]["name"]
    last = [r for r in rows if r["step"] == infos[-1].iteration]
    heatmap(last, a.out + "_heatmap.png",
            f"{name}, step {infos[-1].iteration}, run under recipe {recipe}, {tokens.shape[0]}x"
            f"{tokens.shape[1] - 1} tokens")
    written = [a.out + ".csv", a.out + "_heatmap.png", a.out + ".md"]
    if len(infos) > 1:
        training_plot(rows, a.out + "_training.png", f"{name}, recipe {recipe}")
        written.append(a.out + "_training.png")
    table = summary(rows)
    with open(a.out + ".md", "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    print("wrote " + ", ".join(written))
    return 0
