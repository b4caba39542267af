"""Gradient fidelity of the FP4 recipes along a training trajectory.

For each checkpoint and one fixed batch: the full-model gradient (every parameter, one forward and
backward of the mean token loss on the checkpoint's weights) under each recipe, against the
gradient of a reference on the same weights and tokens (the BF16 recipe, or the unquantized model
in FP32): relative error ‖g − g_ref‖ / ‖g_ref‖ and cosine, over the whole model, per transformer
layer, per linear weight and per other parameter tensor. During each recipe's backward, the
operands of the transformer layers' linears (inputs X, output gradients G) are reduced to their
mean-bias statistics: μ-to-residual ratio and NVFP4 error without and with the mean split, in
both block orientations (mean_bias.ORIENTATIONS). Command line: tools/gradient_fidelity.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from megatron_averis.diagnostics import checkpoint as ckpt
from megatron_averis.diagnostics.batch import batch_tokens, data_prefix
from megatron_averis.diagnostics.capture import (
    LinearStatsCapture,
    backward_mean_loss,
    describe,
    linear_modules,
)
from megatron_averis.diagnostics.compare import require_matplotlib
from megatron_averis.diagnostics.fidelity_report import (
    LINEAR_ORDER,
    OPERAND_FIELDS,
    OPERAND_STATS,
    QERR,
    SCOPES,
    JsonlSink,
    read_jsonl,
    summary,
    write_outputs,
)
from megatron_averis.diagnostics.mean_bias import ORIENTATIONS, mean_norm_stats, quantization_errors
from megatron_averis.recipes import (
    PRESETS,
    Recipe,
    RecipeError,
    canonical_name,
    check_token_count,
    get_recipe,
)

DEFAULT_RECIPES = ("bf16", "nvfp4-plain", "nvfp4-nohadamard", "nvfp4", "averis", "averis-rht",
                   "averis-paper")
REFERENCES = ("bf16", "fp32")


def default_recipes() -> list[str]:
    """The recipes of DEFAULT_RECIPES this version defines."""
    return [r for r in DEFAULT_RECIPES if r in PRESETS]


@dataclass
class Settings:
    recipes: list[str]          # canonical preset names, in order
    reference: str              # "bf16" (the BF16 recipe) or "fp32" (unquantized FP32 model)
    bf16_params: bool           # the recipes run with BF16 parameters (else FP32)
    device: torch.device
    operand_recipes: set[str]   # recipes whose backward's operands are reduced to statistics
    mean_format: str = "bf16"   # μ's format in the split of the operand statistics
    rht_seed: int = 0
    overrides: tuple = ()       # recipe overrides applied to every FP4 recipe (e.g. sr_seed=7)

    def recipe(self, name: str) -> Recipe:
        return recipe_with_overrides(name, self.overrides)


def recipe_with_overrides(name: str, overrides) -> Recipe:
    """Preset `name` with `overrides` (Recipe.with_overrides); the BF16 recipe stays as it is."""
    r = get_recipe(name)
    return r if r.is_bf16 else r.with_overrides(overrides)


# -- gradients -----------------------------------------------------------------------------------

def load_weights(info: ckpt.CheckpointInfo, device) -> dict:
    """The checkpoint's model state (merged to TP = PP = 1), on `device`, in the run's dtype."""
    return ckpt.load_model(info, recipe="bf16", device=device).state_dict()


def build(config: dict, recipe: Recipe | str, *, bf16: bool, weights: dict, device) -> torch.nn.Module:
    """The run's model under `recipe` with BF16 or FP32 parameters, holding `weights`."""
    from megatron_averis.training.cpu_compat import cpu_training

    with cpu_training():
        model = ckpt.build_model(config, recipe=recipe, bf16=bf16, device=device)
    model.load_state_dict(weights)
    return model.train()


def operand_report(x: torch.Tensor, mean_format: str = "bf16", rht_seed: int = 0) -> dict:
    """OPERAND_STATS of one operand x [tokens, features]."""
    stats = mean_norm_stats(x)
    rep = {k: stats[k] for k in OPERAND_STATS[:2]}
    for along in ORIENTATIONS:
        errs = quantization_errors(x, mean_format, rht_seed, along=along)
        rep.update({f"{k}_{along}": errs[k] for k in QERR})
    return rep


def in_transformer_layer(module_name: str) -> bool:
    return describe(module_name)[0] is not None


def gradient(model: torch.nn.Module, tokens: torch.Tensor, *, operands: bool = False,
             mean_format: str = "bf16", rht_seed: int = 0) -> tuple[float, dict, list[dict]]:
    """(loss, {parameter name: gradient}, operand rows) of one forward and backward of the mean
    token loss; operand rows (capture.LinearStatsCapture with operand_report) for the transformer
    layers' linears when `operands`."""
    model.zero_grad(set_to_none=True)
    if operands:
        report = lambda x: operand_report(x, mean_format, rht_seed)  # noqa: E731
        with LinearStatsCapture(model, grads=True, report=report, select=in_transformer_layer) as cap:
            loss = backward_mean_loss(model, tokens)
        rows = cap.rows
    else:
        loss, rows = backward_mean_loss(model, tokens), []
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    return loss, grads, rows


def parameter_groups(model: torch.nn.Module) -> dict[str, tuple[int | None, str, bool]]:
    """parameter name -> (transformer layer or None, short module name, is a linear's weight)."""
    linears = {n for n, _ in linear_modules(model)}
    groups = {}
    for name, _ in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        layer, short = describe(module)
        groups[name] = (layer, short, module in linears and leaf == "weight")
    return groups


def _sums(g: torch.Tensor, r: torch.Tensor) -> np.ndarray:
    """[‖g − r‖², ‖r‖², ‖g‖², ⟨g, r⟩] in float64."""
    g, r = g.detach().double(), r.detach().double()
    return torch.stack([(g - r).square().sum(), r.square().sum(), g.square().sum(),
                        (g * r).sum()]).cpu().numpy()


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _record(sums: np.ndarray, numel: int, **where) -> dict:
    dd, rr, gg, gr = (float(v) for v in sums)
    return {**where, "numel": numel, "ref_norm": math.sqrt(rr), "norm": math.sqrt(gg),
            "rel_error": _finite(math.sqrt(dd / rr)) if rr > 0 else None,
            "cosine": _finite(gr / math.sqrt(gg * rr)) if gg * rr > 0 else None}


def compare(grads: dict, ref: dict, groups: dict) -> list[dict]:
    """Records of the gradient against the reference, per scope (fidelity_report.SCOPES)."""
    per = {n: (_sums(grads[n], ref[n]), ref[n].numel()) for n in ref}
    buckets: dict[tuple, list[str]] = {("total", None, None, None): list(per)}
    for n, (layer, short, is_linear) in groups.items():
        if layer is not None:
            buckets.setdefault(("layers", None, None, None), []).append(n)
            buckets.setdefault(("layer", layer, None, None), []).append(n)
            if is_linear:
                buckets.setdefault(("linear", layer, short, n.rpartition(".")[0]), []).append(n)
        else:
            buckets.setdefault(("other", None, short if is_linear else None,
                                n.rpartition(".")[0]), []).append(n)

    def order(key):
        scope, layer, lin, module = key
        return (SCOPES.index(scope), -1 if layer is None else layer,
                LINEAR_ORDER.index(lin) if lin in LINEAR_ORDER else 99, module or "")

    out = []
    for key in sorted(buckets, key=order):
        scope, layer, lin, module = key
        names = buckets[key]
        out.append(_record(sum(per[n][0] for n in names), sum(per[n][1] for n in names),
                           scope=scope, layer=layer, linear=lin, module=module))
    return out


def evaluate(info: ckpt.CheckpointInfo, tokens: torch.Tensor, s: Settings, emit, log) -> None:
    """Every recipe's records for one checkpoint, passed to emit(list of records) per recipe."""
    start = time.monotonic()
    cfg, it = info.config, info.iteration
    weights = load_weights(info, s.device)
    tokens = tokens.to(s.device)
    # The BF16 recipe in the recipes' dtype, or the unquantized model in FP32.
    model = build(cfg, "bf16", bf16=s.bf16_params and s.reference == "bf16", weights=weights,
                  device=s.device)
    groups = parameter_groups(model)
    ref_loss, ref, _ = gradient(model, tokens)
    del model
    log(f"iteration {it}: reference {s.reference} loss {ref_loss:.4f} "
        f"({time.monotonic() - start:.1f} s)")
    for i, name in enumerate(s.recipes, 1):
        t0 = time.monotonic()
        model = build(cfg, s.recipe(name), bf16=s.bf16_params, weights=weights, device=s.device)
        loss, grads, rows = gradient(model, tokens, operands=name in s.operand_recipes,
                                     mean_format=s.mean_format, rht_seed=s.rht_seed)
        del model
        recs = [{"record": "gradient", "iteration": it, "recipe": name, "reference": s.reference,
                 **r, "loss": loss, "ref_loss": ref_loss} for r in compare(grads, ref, groups)]
        del grads
        recs += [{"record": "operand", "iteration": it, "recipe": name,
                  **{k: r[k] for k in OPERAND_FIELDS[2:]}} for r in rows]
        emit(recs)
        total = recs[0]
        log(f"iteration {it}: {name} ({i}/{len(s.recipes)}) loss {loss:.4f}, rel. error "
            f"{_fmt(total['rel_error'])}, cosine {_fmt(total['cosine'], 6)} "
            f"({time.monotonic() - t0:.1f} s, {time.monotonic() - start:.1f} s for this checkpoint"
            f"{_peak_memory(s.device)})")


def _peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


# -- inputs --------------------------------------------------------------------------------------

def resolve_recipes(names: list[str]) -> list[str]:
    """Canonical preset names, duplicates dropped; an unknown name raises RecipeError."""
    out = []
    for n in names:
        c = canonical_name(n)
        if c not in out:
            out.append(c)
    return out


def select_checkpoints(load: str, steps: list[str] | None) -> list[ckpt.CheckpointInfo]:
    """The checkpoints of --load: the latest (steps None), every one (["all"]) or these steps."""
    if not os.path.exists(load):
        raise FileNotFoundError(f"--load {load!r} does not exist; give the trainer's --save "
                                "directory or one of its iter_* directories")
    latest = ckpt.find(load)
    if not steps:
        return [latest]
    single = os.path.abspath(latest.path) == os.path.abspath(load)
    present = {latest.iteration: latest} if single else {
        i.iteration: i for i in ckpt.list_checkpoints(load)}
    if steps == ["all"]:
        return [present[s] for s in sorted(present)]
    try:
        wanted = sorted({int(s) for s in steps})
    except ValueError:
        raise ValueError(f"--steps takes iteration numbers or 'all', got {' '.join(steps)}") from None
    missing = [s for s in wanted if s not in present]
    if missing:
        raise FileNotFoundError(f"--load {load!r} has no complete checkpoint of iteration "
                                f"{', '.join(map(str, missing))}; it holds iterations "
                                f"{', '.join(map(str, sorted(present)))}")
    return [present[s] for s in wanted]


def check_batch(tokens: torch.Tensor, recipes: list[Recipe], config: dict) -> None:
    """The batch fits the model and every recipe (wgrad blocks run along tokens)."""
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    for recipe in recipes:
        check_token_count(recipe, n, "the batch")
    if n % 16:
        raise ValueError(f"the batch has {n} tokens; the operand statistics quantize along tokens "
                         "in 16-blocks: make --batch-size x --seq-length a multiple of 16")
    if int(tokens.max()) >= config["padded_vocab_size"]:
        raise ValueError(f"the data holds token id {int(tokens.max())}, beyond the model's "
                         f"vocabulary ({config['padded_vocab_size']}); pass --data-prefix of data "
                         "made with the run's tokenizer")


# -- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/gradient_fidelity.py",
        description="Full-model gradient of checkpoints under each recipe against a reference "
                    "gradient of the same weights and tokens (relative error, cosine; total, per "
                    "layer, per linear), with the mean-bias statistics of the linears' operands.")
    p.add_argument("--load", help="the trainer's --save directory, or one iter_* directory")
    p.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                   help="iterations to evaluate, or 'all' (default: the latest)")
    p.add_argument("--recipes", nargs="+", default=None, metavar="RECIPE",
                   help=f"presets to evaluate (default: {' '.join(default_recipes())})")
    p.add_argument("--reference", choices=REFERENCES, default="bf16",
                   help="bf16: the BF16 recipe's gradient in the recipes' dtype; fp32: the "
                        "unquantized model with FP32 parameters")
    p.add_argument("--dtype", choices=("run", "bf16", "fp32"), default="run",
                   help="parameter dtype the recipes run with (default: the run's, BF16 for "
                        "--bf16 / --fp4-recipe runs)")
    p.add_argument("--data-prefix", default=None,
                   help="indexed dataset of the batch (default: the run's validation data)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's micro-batch")
    p.add_argument("--seq-length", type=int, default=None, help="default: the run's")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the batch's windows from the data (the same batch for every "
                        "checkpoint and recipe); -1: the first tokens of the data")
    p.add_argument("--recipe-override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="applied to every FP4 recipe, as the trainer's --fp4-recipe-override "
                        "(e.g. sr_seed=7 for another draw of the stochastic rounding)")
    p.add_argument("--operand-recipes", nargs="*", default=None, metavar="RECIPE",
                   help="recipes whose backward's operands get statistics (default: all "
                        "evaluated; none given: no operand statistics)")
    p.add_argument("--mean-format", choices=("fp32", "bf16"), default="bf16",
                   help="format of μ in the operand statistics' mean split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="gradient_fidelity",
                   help="output prefix: OUT.jsonl, OUT_gradients.csv, OUT_operands.csv, OUT.md, "
                        "with --plot OUT_layers.png and OUT_steps.png")
    p.add_argument("--plot", action="store_true", help="write the PNG figures")
    p.add_argument("--from-jsonl", default=None, metavar="JSONL",
                   help="write CSV / Markdown / figures from a JSONL of an earlier run (also its "
                        ".partial file) instead of computing")
    return p


def _prepare(a) -> tuple[Settings, list, torch.Tensor, dict]:
    """Every input checked before any model is built."""
    if not a.load:
        raise ValueError("--load is required (or --from-jsonl to redraw an earlier result)")
    recipes = resolve_recipes(a.recipes or default_recipes())
    operand_recipes = set(recipes) if a.operand_recipes is None else set(
        resolve_recipes(a.operand_recipes))
    if operand_recipes - set(recipes):
        raise ValueError(f"--operand-recipes {sorted(operand_recipes - set(recipes))} are not "
                         f"among --recipes {recipes}")
    device = ckpt.resolve_device(a.device)
    infos = select_checkpoints(a.load, a.steps)
    cfg = infos[-1].config
    seq = a.seq_length or cfg["seq_length"]
    tokens = batch_tokens(a.data_prefix or data_prefix(cfg), a.batch_size or cfg["micro_batch_size"],
                          seq, None if a.seed < 0 else a.seed)
    overrides = tuple(a.recipe_override)
    check_batch(tokens, [recipe_with_overrides(r, overrides) for r in recipes], cfg)
    if seq > cfg["arch"]["max_position_embeddings"]:
        raise ValueError(f"--seq-length {seq} exceeds the model's "
                         f"{cfg['arch']['max_position_embeddings']} positions")
    bf16 = cfg["bf16"] if a.dtype == "run" else a.dtype == "bf16"
    setup = {"record": "setup", "run": cfg.get("run_name"), "load": a.load,
             "iterations": [i.iteration for i in infos], "recipes": recipes,
             "reference": a.reference, "dtype": "bf16" if bf16 else "fp32", "device": str(device),
             "recipe_overrides": list(overrides), "batch_size": tokens.shape[0],
             "seq_length": seq, "seed": a.seed,
             "data_prefix": a.data_prefix or data_prefix(cfg), "mean_format": a.mean_format,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "torch": torch.__version__}
    s = Settings(recipes=recipes, reference=a.reference, bf16_params=bf16, device=device,
                 operand_recipes=operand_recipes, mean_format=a.mean_format, overrides=overrides)
    return s, infos, tokens, setup


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    log = lambda msg: print(f"gradient_fidelity: {msg}", flush=True)  # noqa: E731
    try:
        if a.plot:
            require_matplotlib()
        if a.from_jsonl:
            records = read_jsonl(a.from_jsonl)
        else:
            with ckpt.single_process():
                s, infos, tokens, setup = _prepare(a)
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                sink = JsonlSink(a.out)
                sink([setup])
                log(f"{len(infos)} checkpoint(s) x {len(s.recipes)} recipe(s) against "
                    f"{s.reference}, {tokens.shape[0]} x {tokens.shape[1] - 1} tokens on {s.device}")
                for info in infos:
                    evaluate(info, tokens, s, sink, log)
                sink.commit()
                records = sink.records
    except (OSError, ValueError, RuntimeError, KeyError, RecipeError) as e:
        print(f"gradient_fidelity: {e}", file=sys.stderr)
        return 2
    written = write_outputs(records, a.out, a.plot)
    print(summary(records, next((r for r in records if r.get("record") == "setup"), {})))
    log("wrote " + ", ".join(([] if a.from_jsonl else [a.out + ".jsonl"]) + written))
    return 0
