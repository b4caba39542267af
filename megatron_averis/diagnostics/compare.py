"""Compare runs: loss curves (raw and smoothed) in one figure, and the relative loss gap to a
baseline run, (L − L_base) / L_base averaged over the last K% of steps (the Averis paper's metric),
as a Markdown table. Command line: tools/compare_runs.py."""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from megatron_averis.diagnostics.runs import SPLITS, Curve, Run, load_runs


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: exponential moving average, debiased at the start
    (s_t = w·s_{t−1} + (1−w)·x_t, s_0 = 0, reported as s_t / (1 − w^t)). NaNs are skipped."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out = np.empty(len(values))
    s, n = 0.0, 0
    for i, x in enumerate(values):
        if math.isfinite(x):
            s = weight * s + (1 - weight) * x
            n += 1
        out[i] = s / (1 - weight**n) if n else math.nan
    return out


def auto_smoothing(n_points: int) -> float:
    """An EMA weight whose memory, 1/(1 − w) points, is 5% of the curve (no smoothing below 40
    points): 0.5 for 40 logged points, 0.98 for 1000."""
    return 1.0 - 1.0 / max(1.0, n_points / 20)


def relative_gap(run: Curve, base: Curve, last_percent: float) -> tuple[float, int, int]:
    """(mean of (L − L_base)/L_base, points used, last step) over the run's logged steps in the
    last `last_percent`% of the steps both runs reached. L_base is interpolated linearly in step
    where the baseline did not log that step. With no logged step in the window, the run's last
    step within the common range is used."""
    if not 0 < last_percent <= 100:
        raise ValueError(f"--last-percent must be in (0, 100], got {last_percent}")
    if len(run) == 0 or len(base) == 0:
        return math.nan, 0, 0
    end = int(min(run.steps[-1], base.steps[-1]))
    lo = end * (1 - last_percent / 100)
    sel = (run.steps >= lo) & (run.steps <= end) & (run.steps >= base.steps[0])
    if not sel.any():
        sel = (run.steps <= end) & (run.steps >= base.steps[0])
        if not sel.any():
            return math.nan, 0, end
        sel = np.flatnonzero(sel)[-1:]
    steps, values = run.steps[sel], run.values[sel]
    base_values = np.interp(steps, base.steps, base.values)
    return float(np.mean((values - base_values) / base_values)), int(np.size(steps)), end


def window_mean(curve: Curve, end: int, last_percent: float) -> float:
    sel = (curve.steps >= end * (1 - last_percent / 100)) & (curve.steps <= end)
    if not sel.any():
        sel = np.flatnonzero(curve.steps <= end)[-1:]
    return float(np.mean(curve.values[sel])) if np.size(sel) and np.any(sel) else math.nan


def max_step_difference(run: Curve, base: Curve) -> tuple[float, int]:
    """(max over the steps both logged of |L − L_base| / L_base, the step where it occurs): the
    per-step agreement of two runs that should compute the same thing (parallel layouts)."""
    steps, ia, ib = np.intersect1d(run.steps, base.steps, return_indices=True)
    if steps.size == 0:
        return math.nan, 0
    rel = np.abs(run.values[ia] - base.values[ib]) / np.abs(base.values[ib])
    i = int(np.argmax(rel))
    return float(rel[i]), int(steps[i])


def per_step_table(runs: list[Run], baseline: str) -> str:
    """Markdown: each run's largest per-step training-loss difference from the baseline, and the
    last common step's losses."""
    base = next(r for r in runs if r.label == baseline)
    lines = [f"| run vs {baseline} | max per-step train-loss difference | at step | last step: "
             f"{baseline} / run |", "|---|---|---|---|"]
    for r in runs:
        if r is base:
            continue
        diff, step = max_step_difference(r.curve("train"), base.curve("train"))
        common = np.intersect1d(r.curve("train").steps, base.curve("train").steps)
        last = ("–" if common.size == 0 else
                f"{base.curve('train').values[base.curve('train').steps == common[-1]][0]:.4f} / "
                f"{r.curve('train').values[r.curve('train').steps == common[-1]][0]:.4f}")
        lines.append(f"| {r.label} | {_fmt(100 * diff, '.3f')}% | {step} | {last} |")
    return "\n".join(lines) + "\n"


def gap_rows(runs: list[Run], baseline: str, last_percent: float) -> list[dict]:
    base = next((r for r in runs if r.label == baseline), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not among the runs {[r.label for r in runs]}; "
                         "pass --baseline with one of these labels")
    rows = []
    for r in runs:
        row = {"run": r.label, "recipe": r.info.get("recipe", ""),
               "steps": int(r.curve("train").steps[-1])}
        for split in SPLITS:
            gap, n, end = relative_gap(r.curve(split), base.curve(split), last_percent)
            row[f"{split}_loss"] = window_mean(r.curve(split), end, last_percent) if n else math.nan
            row[f"{split}_gap"] = gap
            row[f"{split}_points"] = n
        rows.append(row)
    return rows


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def markdown_table(rows: list[dict], baseline: str, last_percent: float) -> str:
    lines = [
        f"Relative loss gap (L − L_base) / L_base to the baseline `{baseline}`, mean over the "
        f"logged steps in the last {last_percent:g}% of the steps both runs reached.",
        "",
        "| run | recipe | steps | train loss | train gap | valid loss | valid gap |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['recipe'] or '–'} | {r['steps']} | {_fmt(r['train_loss'], '.4f')} | "
            f"{_fmt(100 * r['train_gap'], '+.2f')}% | {_fmt(r['valid_loss'], '.4f')} | "
            f"{_fmt(100 * r['valid_gap'], '+.2f')}% |")
    return "\n".join(lines) + "\n"


def _ylim(curves: list[np.ndarray], skip_fraction: float = 0.1):
    """Limits that show the later part of the curves (the early drop would flatten the rest)."""
    tails = [c[int(len(c) * skip_fraction):] for c in curves if len(c)]
    vals = np.concatenate([t[np.isfinite(t)] for t in tails]) if tails else np.zeros(0)
    if not len(vals):
        return None
    lo, hi = float(vals.min()), float(vals.max())
    pad = 0.05 * (hi - lo or abs(hi) or 1.0)
    return lo - pad, hi + pad


def plot(runs: list[Run], baseline: str, path: str, smoothing: float, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in runs if r.label == baseline)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    smoothed = {split: [] for split in SPLITS}
    for i, r in enumerate(runs):
        color = colors[i % len(colors)]
        for ax, split in zip(axes[:2], SPLITS):
            c = r.curve(split)
            if not len(c):
                continue
            s = ema(c.values, smoothing if split == "train" else 0.0)
            smoothed[split].append(s)
            if split == "train":
                ax.plot(c.steps, c.values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(c.steps, s, color=color, linewidth=1.8, label=r.label)
            else:
                ax.plot(c.steps, c.values, color=color, marker="o", markersize=3, linewidth=1.5,
                        label=r.label)
        if r is not base:
            c, b = r.curve("train"), base.curve("train")
            end = min(c.steps[-1], b.steps[-1])
            sel = (c.steps >= b.steps[0]) & (c.steps <= end)
            gap = (c.values[sel] - np.interp(c.steps[sel], b.steps, b.values)) / np.interp(
                c.steps[sel], b.steps, b.values)
            axes[2].plot(c.steps[sel], 100 * gap, color=color, alpha=0.25, linewidth=0.8)
            axes[2].plot(c.steps[sel], 100 * ema(gap, smoothing), color=color, linewidth=1.8,
                         label=r.label)
    axes[0].set_title(f"train loss (thin: raw, bold: EMA {smoothing:.2g})")
    axes[1].set_title("validation loss")
    axes[2].set_title(f"train-loss gap to {baseline} (thin: raw, bold: EMA)")
    axes[2].axhline(0, color="black", linewidth=0.8)
    axes[2].set_ylabel("(L − L_base) / L_base  [%]")
    for ax, split in zip(axes[:2], SPLITS):
        ax.set_ylabel("loss")
        lim = _ylim(smoothed[split]) if split == "train" else None
        if lim:
            ax.set_ylim(*lim)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("the plots need matplotlib: pip install matplotlib") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/compare_runs.py",
        description="Loss curves of several runs in one PNG, and the relative loss gap to a "
                    "baseline run as a Markdown table.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="[LABEL=]PATH: a run directory (the trainer's --log-dir), its "
                        "metrics.jsonl or a TensorBoard directory; or wandb:ENTITY/PROJECT"
                        "[/RUN_ID] (online)")
    p.add_argument("--baseline", default=None,
                   help="label of the reference run (default: the run whose recipe is bf16, "
                        "else the first)")
    p.add_argument("--last-percent", type=float, default=10.0,
                   help="the gap is averaged over this last part of the steps, in %%")
    p.add_argument("--smoothing", default="auto",
                   help="EMA weight of the smoothed curves (TensorBoard's slider), in [0, 1); "
                        "auto: memory of 5%% of the logged points")
    p.add_argument("--source", choices=("auto", "jsonl", "tb"), default="auto",
                   help="for run directories: metrics.jsonl (auto: when present) or TensorBoard")
    p.add_argument("--wandb-group", default=None, help="with wandb:ENTITY/PROJECT: only this group")
    p.add_argument("--out", default="compare",
                   help="output prefix: writes OUT.png and OUT.md")
    p.add_argument("--title", default=None)
    p.add_argument("--per-step", action="store_true",
                   help="also each run's largest per-step loss difference from the baseline "
                        "(OUT-per-step.md): for runs that should agree step by step")
    return p


def _default_baseline(runs: list[Run]) -> str:
    bf16 = [r.label for r in runs if r.info.get("recipe") == "bf16"]
    return bf16[0] if len(bf16) == 1 else runs[0].label


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        require_matplotlib()
        runs = load_runs(a.runs, a.source, a.wandb_group)
        baseline = a.baseline or _default_baseline(runs)
        rows = gap_rows(runs, baseline, a.last_percent)
        table = markdown_table(rows, baseline, a.last_percent)
        if a.smoothing == "auto":
            smoothing = auto_smoothing(max(len(r.curve("train")) for r in runs))
        else:
            try:
                smoothing = float(a.smoothing)
            except ValueError:
                raise ValueError(f"--smoothing {a.smoothing!r}: give a number in [0, 1) or auto") from None
            ema(np.zeros(1), smoothing)  # validates it before drawing
    except (OSError, ValueError, RuntimeError) as e:
        print(f"compare_runs: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    plot(runs, baseline, a.out + ".png", smoothing, a.title)
    with open(a.out + ".md", "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    if a.per_step:
        steps_table = per_step_table(runs, baseline)
        with open(a.out + "-per-step.md", "w", encoding="utf-8") as f:
            f.write(steps_table)
        print(steps_table)
    print(f"wrote {a.out}.png and {a.out}.md")
    return 0
