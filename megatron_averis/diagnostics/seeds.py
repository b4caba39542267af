"""Recipe comparisons over several seeds: loss per recipe as mean ± spread, and paired tests.

Runs are grouped by (recipe, seed) from their saved configuration. A run's loss is the mean
over the last `last_percent`% of its logged steps (train) or its last validation; its gap is
relative to the baseline recipe's run *of the same seed* (same initialisation and data order),
so the seed's own variation cancels. A paired comparison of recipes A and B takes the per-seed
relative differences d_s = (L_A,s − L_B,s) / L_B,s and reports their mean, standard deviation,
Student's t and the two-sided p-value of "mean difference = 0", and how many seeds favour A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_averis.diagnostics.compare import _fmt, window_mean
from megatron_averis.diagnostics.runs import SPLITS, Curve, Run


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if df < 1:
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass
class Paired:
    a: str
    b: str
    split: str
    diffs: dict[int, float]  # seed -> (L_a - L_b) / L_b

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.diffs.values()))) if self.diffs else math.nan

    @property
    def std(self) -> float:
        return float(np.std(list(self.diffs.values()), ddof=1)) if self.n > 1 else math.nan

    @property
    def t(self) -> float:
        if self.n < 2:
            return math.nan
        if self.std == 0:
            return math.copysign(math.inf, self.mean) if self.mean else 0.0
        return self.mean / (self.std / math.sqrt(self.n))

    @property
    def p(self) -> float:
        return t_two_sided_p(self.t, self.n - 1) if self.n > 1 else math.nan

    @property
    def a_better(self) -> int:
        return sum(d < 0 for d in self.diffs.values())


def run_key(run: Run) -> tuple[str, int]:
    recipe, seed = run.info.get("recipe"), run.info.get("seed")
    if recipe is None or seed is None:
        raise ValueError(f"run {run.label!r} has no recipe or seed in its saved configuration")
    return recipe, int(seed)


def final_loss(run: Run, split: str, last_percent: float, until: int | None = None) -> float:
    """Train: the mean over the last `last_percent`% of steps; valid: the last validation. With
    `until`, of the steps up to it (NaN when the run stopped before it): runs cut short can
    then be compared at a step they all reached."""
    curve = run.curve(split)
    if until is not None:
        if len(run.curve("train")) == 0 or run.curve("train").steps[-1] < until:
            return math.nan
        keep = curve.steps <= until
        curve = Curve(curve.steps[keep], curve.values[keep])
    if len(curve) == 0:
        return math.nan
    if split == "valid":
        return float(curve.values[-1])
    return window_mean(curve, int(curve.steps[-1]), last_percent)


def by_recipe_and_seed(runs: list[Run], split: str, last_percent: float,
                       until: int | None = None) -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    for run in runs:
        recipe, seed = run_key(run)
        if seed in table.setdefault(recipe, {}):
            raise ValueError(f"two runs of recipe {recipe!r} with seed {seed}; give each once")
        table[recipe][seed] = final_loss(run, split, last_percent, until)
    return table


def paired(table: dict[str, dict[int, float]], a: str, b: str, split: str) -> Paired:
    for name in (a, b):
        if name not in table:
            raise ValueError(f"no runs of recipe {name!r}; the runs have {sorted(table)}")
    seeds = sorted(set(table[a]) & set(table[b]))
    diffs = {s: (table[a][s] - table[b][s]) / table[b][s] for s in seeds
             if math.isfinite(table[a][s]) and math.isfinite(table[b][s])}
    return Paired(a, b, split, diffs)


def summary_markdown(runs: list[Run], baseline: str, pairs: list[tuple[str, str]],
                     last_percent: float, until: int | None = None) -> str:
    """Per recipe: loss and gap to the baseline as mean ± std (min–max) over seeds; then the paired
    comparisons."""
    out = []
    tables = {split: by_recipe_and_seed(runs, split, last_percent, until) for split in SPLITS}
    recipes = sorted(tables["train"], key=lambda r: (r != baseline, r))
    upto = "" if until is None else f" up to step {until} (runs that stopped earlier: –)"
    out.append(f"Loss{upto}: train = mean of the last {last_percent:g}% of steps, valid = last "
               "validation. Gap: relative to the same seed's baseline run "
               f"(`{baseline}`), in %. Mean ± sample std over seeds [min, max].\n")
    out.append("| recipe | seeds | train loss | train gap % | valid loss | valid gap % |")
    out.append("|---|---|---|---|---|---|")
    for recipe in recipes:
        cells = [recipe, str(sum(math.isfinite(v) for v in tables["train"][recipe].values()))]
        for split in SPLITS:
            vals = np.array([v for v in tables[split].get(recipe, {}).values() if math.isfinite(v)])
            cells.append(_mean_std(vals, ".4f"))
            if baseline in tables[split] and recipe != baseline:
                gaps = np.array(list(paired(tables[split], recipe, baseline, split).diffs.values()))
                cells.append(_mean_std(100 * gaps, "+.2f", ".2f"))
            else:
                cells.append("—")
        out.append("| " + " | ".join(cells) + " |")
    if pairs:
        out.append("\nPaired by seed: d = (L_A − L_B) / L_B in %; t and the two-sided p-value of "
                   "\"mean d = 0\" (Student, n − 1 degrees of freedom).\n")
        out.append("| A vs B | split | seeds | mean d % | std d % | t | p | seeds with A lower |")
        out.append("|---|---|---|---|---|---|---|---|")
        for a, b in pairs:
            missing = [r for r in (a, b) if r not in tables["train"]]
            if missing:
                out.append(f"| {a} vs {b} | – | 0 | not run: {', '.join(missing)} | | | | |")
                continue
            for split in SPLITS:
                pr = paired(tables[split], a, b, split)
                out.append(f"| {a} vs {b} | {split} | {pr.n} | {_fmt(100 * pr.mean, '+.3f')} | "
                           f"{_fmt(100 * pr.std, '.3f')} | {_fmt(pr.t, '.2f')} | {_fmt(pr.p, '.3f')} | "
                           f"{pr.a_better}/{pr.n} |")
    return "\n".join(out) + "\n"


def _mean_std(vals: np.ndarray, spec: str, std_spec: str = ".4f") -> str:
    if vals.size == 0:
        return "–"
    if vals.size == 1:
        return format(float(vals[0]), spec)
    return (f"{format(float(vals.mean()), spec)} ± {format(float(vals.std(ddof=1)), std_spec)} "
            f"[{format(float(vals.min()), spec)}, {format(float(vals.max()), spec)}]")


def same_seed_gap(run: Curve, base: Curve) -> Curve:
    """(L − L_base) / L_base at the run's steps within the baseline's range (L_base interpolated
    linearly where the baseline did not log that step)."""
    if len(run) == 0 or len(base) == 0:
        return Curve(np.zeros(0, np.int64), np.zeros(0))
    sel = (run.steps >= base.steps[0]) & (run.steps <= base.steps[-1])
    b = np.interp(run.steps[sel], base.steps, base.values)
    return Curve(run.steps[sel], (run.values[sel] - b) / b)


def band_over_seeds(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) over the seeds' curves at the steps every one of them has."""
    steps = curves[0].steps
    for c in curves[1:]:
        steps = np.intersect1d(steps, c.steps)
    vals = np.stack([c.values[np.searchsorted(c.steps, steps)] for c in curves])
    return steps, vals.mean(axis=0), vals.min(axis=0), vals.max(axis=0)


def plot_seed_study(runs: list[Run], baseline: str, pairs: list[tuple[str, str]], path: str) -> None:
    """Three panels, each a mean over seeds with its min–max band: the train-loss gap of every
    recipe to the same seed's baseline (per-seed EMA, as compare_runs smooths), the paired
    differences d(step) of `pairs`, and the validation gap at every evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_averis.diagnostics.compare import auto_smoothing, ema

    by_key = {run_key(r): r for r in runs}
    recipes = sorted({k[0] for k in by_key})

    def gaps(a: str, b: str, split: str) -> list[Curve]:
        out = []
        for (recipe, seed), run in sorted(by_key.items()):
            if recipe == a and (b, seed) in by_key:
                g = same_seed_gap(run.curve(split), by_key[(b, seed)].curve(split))
                if len(g):
                    w = auto_smoothing(len(g)) if split == "train" else 0.0
                    out.append(Curve(g.steps, 100 * ema(g.values, w)))
        return out

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [(axes[0], [(r, baseline) for r in recipes if r != baseline], "train",
               f"train-loss gap to the same seed's {baseline} (EMA), mean and min–max over seeds"),
              (axes[1], pairs, "train", "paired difference d = (L_A − L_B) / L_B (EMA, same seed)"),
              (axes[2], [(r, baseline) for r in recipes if r != baseline], "valid",
               f"validation gap to the same seed's {baseline}")]
    means: dict[object, list[np.ndarray]] = {ax: [] for ax in axes}
    for ax, comparisons, split, title in panels:
        for i, (a, b) in enumerate(comparisons):
            curves = gaps(a, b, split)
            if not curves:
                continue
            steps, mean, lo, hi = band_over_seeds(curves)
            color = colors[i % len(colors)]
            label = f"{a} vs {b} ({len(curves)} seeds)" if ax is axes[1] else f"{a} ({len(curves)})"
            marker = "o" if split == "valid" else None
            ax.plot(steps, mean, color=color, linewidth=1.8, marker=marker, markersize=3, label=label)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
            means[ax].append(mean[len(mean) // 10:])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    # The first steps' gaps swing by several % while the losses fall fast: show the rest.
    for ax in axes[:2]:
        vals = np.concatenate(means[ax]) if means[ax] else np.zeros(0)
        if vals.size:
            pad = 0.3 * (vals.max() - vals.min() or 1.0)
            ax.set_ylim(vals.min() - pad, vals.max() + pad)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
