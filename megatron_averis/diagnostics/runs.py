"""Loss curves of training runs, from the trainer's metrics.jsonl, TensorBoard event files, or
wandb (online).

A run directory is the trainer's --log-dir: metrics.jsonl, config.json and tensorboard/. Every
source is read the same way: train and validation loss by step; when a run was resumed from an
earlier checkpoint, what it logged after that checkpoint's step before the restart is dropped
(the metrics file's "start" record of the resumed process, TensorBoard's orphaned-data purge),
so each step has the value of the timeline that continued.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import numpy as np

from megatron_averis.training.writers import read_records

SPLITS = ("train", "valid")
# The loss of each split under this trainer's name and Megatron-LM's (TensorBoard and wandb), so
# a Megatron-LM run (its --tensorboard-dir, or its wandb run) compares with ours.
LOSS_KEYS = {"train": ("train/loss", "lm loss"), "valid": ("valid/loss", "lm loss validation")}


@dataclass
class Curve:
    steps: np.ndarray  # int64, strictly increasing
    values: np.ndarray  # float64

    @classmethod
    def from_points(cls, points: dict[int, float]) -> "Curve":
        steps = np.array(sorted(points), dtype=np.int64)
        return cls(steps, np.array([points[s] for s in steps], dtype=np.float64))

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class Run:
    label: str
    source: str
    curves: dict[str, Curve]  # "train" / "valid" -> loss curve
    info: dict = field(default_factory=dict)  # recipe, model preset, ... when known

    def curve(self, split: str) -> Curve:
        return self.curves.get(split, Curve(np.zeros(0, np.int64), np.zeros(0)))


def _truncate(points: dict[int, float], last_step: int) -> None:
    for s in [s for s in points if s > last_step]:
        del points[s]


def read_metrics_jsonl(path: str) -> tuple[dict[str, Curve], dict]:
    """(curves, config of the last start record) from a trainer's metrics.jsonl."""
    points = {split: {} for split in SPLITS}
    config: dict = {}
    for rec in read_records(path):
        event, step = rec.get("event"), rec.get("step")
        if event == "start":
            config = rec.get("config") or {}
            for p in points.values():
                _truncate(p, int(step))
        elif event in points and "loss" in rec:
            loss = rec["loss"]  # None: the trainer logged a NaN loss
            points[event][int(step)] = float("nan") if loss is None else float(loss)
    return {k: Curve.from_points(v) for k, v in points.items() if v}, config


def read_tensorboard(path: str) -> dict[str, Curve]:
    """Loss curves from a TensorBoard log directory: this trainer's train/loss and valid/loss, or
    Megatron-LM's "lm loss" and "lm loss validation"."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(path, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    curves = {}
    for split in SPLITS:
        tag = next((t for t in LOSS_KEYS[split] if t in tags), None)
        if tag is not None:
            curves[split] = Curve.from_points({e.step: e.value for e in acc.Scalars(tag)})
    if not curves:
        wanted = " / ".join(t for keys in LOSS_KEYS.values() for t in keys)
        raise ValueError(f"{path}: no loss scalars ({wanted}) in the TensorBoard events "
                         f"(found: {sorted(tags) or 'none'})")
    return curves


def _info(config: dict) -> dict:
    recipe = config.get("recipe") or {}
    return {k: v for k, v in {
        "run_name": config.get("run_name"),
        "recipe": recipe.get("name") if isinstance(recipe, dict) else None,
        "model_preset": config.get("model_preset"),
        "seq_length": config.get("seq_length"),
        "global_batch_size": config.get("global_batch_size"),
        "seed": config.get("seed"),
    }.items() if v is not None}


def _has_events(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, "events.out.tfevents.*")))


def load_run(spec: str, source: str = "auto") -> Run:
    """A run from `[LABEL=]PATH`: a run directory, a metrics.jsonl file, or a TensorBoard
    directory. source: auto (metrics.jsonl when there is one, else TensorBoard), jsonl or tb."""
    label, sep, path = spec.partition("=")
    if not sep or not label or os.path.exists(spec):
        label, path = "", spec
    if not os.path.exists(path):
        raise FileNotFoundError(f"run {path!r} does not exist; give a run directory (the trainer's "
                                "--log-dir), its metrics.jsonl, or a TensorBoard directory")
    jsonl = path if os.path.isfile(path) else os.path.join(path, "metrics.jsonl")
    tb_dir = None
    if os.path.isdir(path):
        tb_dir = path if _has_events(path) else os.path.join(path, "tensorboard")
    if source == "jsonl" or (source == "auto" and os.path.isfile(jsonl)):
        if not os.path.isfile(jsonl):
            raise FileNotFoundError(f"{path}: no metrics.jsonl")
        curves, config = read_metrics_jsonl(jsonl)
        run_dir, kind = os.path.dirname(os.path.abspath(jsonl)), "jsonl"
    elif tb_dir is not None and _has_events(tb_dir):
        curves, config = read_tensorboard(tb_dir), {}
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(tb_dir)), "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        run_dir = os.path.abspath(tb_dir)
        if os.path.basename(run_dir) == "tensorboard":
            run_dir = os.path.dirname(run_dir)
        kind = "tensorboard"
    else:
        raise FileNotFoundError(f"{path}: neither metrics.jsonl nor TensorBoard event files "
                                "(events.out.tfevents.*) found")
    if "train" not in curves:
        raise ValueError(f"{path}: no training loss recorded yet")
    info = _info(config)
    label = label or info.get("run_name") or os.path.basename(run_dir)
    return Run(label, f"{kind}:{path}", curves, info)


def load_wandb(path: str, group: str | None = None) -> list[Run]:
    """Runs of a wandb project ('ENTITY/PROJECT', optionally only `group`) or one run
    ('ENTITY/PROJECT/RUN_ID'), read through wandb's public API (needs network and a login)."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("reading wandb runs needs the wandb package: pip install wandb") from None
    parts = path.strip("/").split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"wandb:{path}: use wandb:ENTITY/PROJECT or wandb:ENTITY/PROJECT/RUN_ID")
    api = wandb.Api()
    if len(parts) == 3:
        runs = [api.run(path)]
    else:
        runs = list(api.runs(path, filters={"group": group} if group else None))
        if not runs:
            raise ValueError(f"wandb:{path}: no runs" + (f" in group {group!r}" if group else ""))
    out = []
    for r in runs:
        points = {split: {} for split in SPLITS}
        for split in SPLITS:
            for key in LOSS_KEYS[split]:  # ours, then Megatron-LM's
                for row in r.scan_history(keys=["_step", key]):
                    if row.get(key) is not None:
                        points[split].setdefault(int(row["_step"]), float(row[key]))
        curves = {k: Curve.from_points(v) for k, v in points.items() if v}
        if "train" not in curves:
            raise ValueError(f"wandb run {r.path}: no train/loss or lm loss logged")
        out.append(Run(r.name, f"wandb:{'/'.join(r.path)}", curves, _info(dict(r.config))))
    return out


def load_runs(specs: list[str], source: str = "auto", wandb_group: str | None = None) -> list[Run]:
    """Runs for each spec: `[LABEL=]PATH` or `wandb:ENTITY/PROJECT[/RUN_ID]`."""
    runs: list[Run] = []
    for spec in specs:
        if spec.startswith("wandb:"):
            runs += load_wandb(spec[len("wandb:"):], wandb_group)
        else:
            runs.append(load_run(spec, source))
    labels = [r.label for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"several runs are labelled {dup}; name them with LABEL=PATH")
    return runs
