"""Where metrics go: stdout, <log-dir>/metrics.jsonl, TensorBoard and (when installed) wandb.

Only global rank 0 writes. metrics.jsonl is appended to, so a resumed run continues its file;
every record has an "event" ("start", "train", "valid", "test", "checkpoint", "end") and the step.
wandb runs are named from the preset and recipe (project megatron-averis, group = preset,
name = run name) so that recipes of one model land in one dashboard. The wandb run id is the run
name plus a launch id drawn when a run starts from scratch and kept in its checkpoints: separate
launches (e.g. repeated compose launches into one directory) never merge, and a resume continues
its run. Scalars also go out under Megatron-LM's names ("lm loss", "lm loss validation",
"learning-rate", "grad-norm", "throughput", ...) so a Megatron-LM baseline overlays ours in one
dashboard. Offline mode needs no network (`wandb sync <log-dir>/wandb/wandb/offline-run-*` uploads
later: wandb puts its own `wandb/` folder inside --wandb-save-dir, which defaults to
<log-dir>/wandb).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import secrets
import time

from megatron_averis.training.config import LoggingConfig


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):  # NaN and Inf are not JSON
        return None
    return value


def read_records(path: str, kind: str = "trainer metrics.jsonl") -> list[dict]:
    """The records of a JSONL file (a metrics.jsonl, or `kind`). A last line cut off by a crash
    mid-write is dropped; any other line that is not a JSON record is an error naming it."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON record ({e}); is this a {kind}?") from None
    return records


def _drop_partial_last_line(path: str) -> None:
    """A process killed mid-write leaves a line without its newline; appending to it would merge
    the next record into it."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


class MetricsFile:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        _drop_partial_last_line(path)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **{k: _jsonable(v) for k, v in record.items()}}
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def wandb_status(mode: str | None) -> tuple[str, str]:
    """(mode to use, message to print): disabled when wandb is missing and not asked for."""
    installed = importlib.util.find_spec("wandb") is not None
    if mode is None:
        mode = os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return "disabled", "wandb: disabled (--wandb-mode disabled)"
    if not installed:
        return "disabled", ("wandb: not installed, so metrics go to TensorBoard and metrics.jsonl "
                            "only (`pip install wandb` to add it; offline mode needs no network)")
    return mode, f"wandb: {mode}"


def new_launch_id() -> str:
    """UTC start time and 4 random hex digits: unique per launch, sortable."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + secrets.token_hex(2)


def wandb_run_id(run_name: str, launch_id: str) -> str:
    """`<run name>-<launch id>` in wandb's id alphabet (letters, digits, - and _), under 64."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:44] or "run"
    return f"{name}-{launch_id}"


# Megatron-LM's names of the values of train and valid records (its training loop's scalars).
MEGATRON_LM_NAMES = {
    "train": {"loss": "lm loss", "lr": "learning-rate", "grad_norm": "grad-norm",
              "tflops_per_gpu": "throughput", "seconds_per_iteration": "iteration-time",
              "consumed_samples": "samples vs steps"},
    "valid": {"loss": "lm loss validation", "ppl": "lm loss validation ppl"},
}


def megatron_lm_scalars(event: str, values: dict) -> dict:
    """The record's values under the names Megatron-LM's training loop logs them."""
    names = MEGATRON_LM_NAMES.get(event, {})
    return {names[k]: v for k, v in values.items() if k in names}


class RunLogger:
    """Fan-out of one run's records; a no-op on ranks other than 0."""

    def __init__(self, log: LoggingConfig, config_dict: dict, *, enabled: bool,
                 wandb_id: str | None = None):
        self.enabled = enabled
        self.wandb_id = wandb_id or wandb_run_id(log.run_name, new_launch_id())
        self.tb = None
        self.wandb_run = None
        self.messages: list[str] = []
        if not enabled:
            return
        os.makedirs(log.log_dir, exist_ok=True)
        self.metrics = MetricsFile(os.path.join(log.log_dir, "metrics.jsonl"))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=log.tensorboard_dir)
        mode, message = wandb_status(log.wandb_mode)
        self.messages.append(message)
        if mode != "disabled":
            import wandb

            save_dir = log.wandb_save_dir or os.path.join(log.log_dir, "wandb")
            os.makedirs(save_dir, exist_ok=True)
            run_id = self.wandb_id
            self.wandb_run = wandb.init(
                project=log.wandb_project,
                entity=log.wandb_entity,
                group=log.wandb_group or (log.model_preset or "custom"),
                name=log.wandb_exp_name or log.run_name,
                id=run_id,
                resume="allow",
                dir=save_dir,
                mode=mode,
                config=config_dict,
            )
            self.messages.append(f"wandb: run {run_id} in project {log.wandb_project!r}, "
                                 f"files under {save_dir}")

    def record(self, event: str, step: int, values: dict, *, scalars: dict | None = None) -> None:
        """Write one record; `scalars` (name -> number) also go to TensorBoard and wandb, with
        Megatron-LM's names for train and valid records."""
        if not self.enabled:
            return
        self.metrics.write({"event": event, "step": step, **values})
        if scalars is not None:
            scalars = {**scalars, **megatron_lm_scalars(event, values)}
        for name, value in (scalars or {}).items():
            if value is None:
                continue
            self.tb.add_scalar(name, value, step)
        if self.wandb_run is not None and scalars:
            self.wandb_run.log({k: v for k, v in scalars.items() if v is not None}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
