"""A recipe study: many single-GPU training runs (recipe x seed) packed onto the GPUs of one
machine, then one table of loss per recipe over seeds with paired comparisons.

    python3 tools/recipe_study.py launch --model qwen3-25m --recipes bf16 averis --seeds 1 2 3 \\
        --gpus 0 1 --per-gpu 4 --out-dir runs/study --deadline-min 9 -- --train-iters 400
    python3 tools/recipe_study.py summarize runs/study --pairs averis:nvfp4-nohadamard \\
        --out results/study

Each job is examples/pretrain/train.sh MODEL RECIPE with SEED, RUN_NAME=MODEL-RECIPE-sSEED and
OUT_DIR; flags after `--` go to every run (argparse: last wins over config.sh's). Small models
leave most of an H100/H200 idle, so several runs share one GPU. Jobs start seed by seed, so a
deadline leaves whole seeds finished; at the deadline running jobs get SIGTERM (the trainer's
--exit-signal-handler saves a checkpoint) and a later launch with the same arguments resumes
them and skips the finished ones.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from megatron_averis.training.writers import read_records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SH = os.path.join(REPO, "examples", "pretrain", "train.sh")


@dataclass
class Job:
    model: str
    recipe: str
    seed: int
    out_dir: str
    gpu: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0
    log: object = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.recipe}-s{self.seed}"

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)

    def last_record(self) -> dict | None:
        """The last complete record of the run's metrics.jsonl (None before the first)."""
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return None
        records = read_records(path)  # a last line being written is left out
        return records[-1] if records else None

    def finished(self) -> bool:
        rec = self.last_record()  # a run stopped by a signal also ends its log, flagged
        return rec is not None and rec.get("event") == "end" and not rec.get("stopped_by_signal")


def plan(models: str | list[str], recipes: list[str], seeds: list[int], out_dir: str) -> list[Job]:
    """Seed-major order: every model and recipe of the first seed before the next seed."""
    models = [models] if isinstance(models, str) else models
    return [Job(m, r, s, out_dir) for s in seeds for m in models for r in recipes]


def _start(job: Job, gpu: int, port: int, extra: list[str]) -> None:
    env = dict(os.environ, SEED=str(job.seed), RUN_NAME=job.name, OUT_DIR=job.out_dir,
               NPROC_PER_NODE="1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES=str(gpu),
               PYTHONUNBUFFERED="1")
    os.makedirs(job.out_dir, exist_ok=True)
    job.log = open(os.path.join(job.out_dir, f"{job.name}.log"), "a", encoding="utf-8")
    job.proc = subprocess.Popen(["bash", TRAIN_SH, job.model, job.recipe, *extra], env=env,
                                stdout=job.log, stderr=subprocess.STDOUT, start_new_session=True)
    job.gpu, job.started = gpu, time.time()


def _stop(job: Job, sig: int) -> None:
    """SIGTERM goes to the launcher alone (torchrun passes it to the ranks, whose exit-signal
    handler saves a checkpoint): sent to the whole group it would also kill the ranks' data-loader
    workers, and the ranks die of that before they can save. SIGKILL goes to the group."""
    try:
        if sig == signal.SIGKILL:
            os.killpg(job.proc.pid, sig)
        else:
            job.proc.send_signal(sig)
    except ProcessLookupError:
        pass


def launch(jobs: list[Job], gpus: list[int], per_gpu: int, extra: list[str], deadline_s: float,
           port_base: int = 29600, poll_s: float = 5.0, out=print) -> dict:
    """Run the jobs, at most `per_gpu` at a time on each GPU, until done or the deadline."""
    t0 = time.time()
    todo = [j for j in jobs if not j.finished()]
    skipped = len(jobs) - len(todo)
    running: list[Job] = []
    done: list[Job] = []
    failed: list[Job] = []
    ports = iter(range(port_base, port_base + 10_000))
    out(f"study: {len(jobs)} jobs, {skipped} already finished, {len(gpus)} GPU(s) x {per_gpu}")
    last_report = 0.0
    while todo or running:
        for job in list(running):
            rc = job.proc.poll()
            if rc is None:
                continue
            running.remove(job)
            job.log.close()
            (done if rc == 0 and job.finished() else failed).append(job)
            out(f"study: {job.name} {'finished' if job in done else f'FAILED rc={rc}'} "
                f"after {time.time() - job.started:.0f} s (log {job.name}.log)")
        elapsed = time.time() - t0
        if elapsed > deadline_s:
            break
        for gpu in gpus:
            while todo and sum(j.gpu == gpu for j in running) < per_gpu:
                job = todo.pop(0)
                _start(job, gpu, next(ports), extra)
                running.append(job)
        if time.time() - last_report >= 30:
            last_report = time.time()
            steps = ", ".join(f"{j.name}@{(j.last_record() or {}).get('step', 0)}" for j in running)
            out(f"study: {elapsed:.0f} s | done {len(done)} failed {len(failed)} running "
                f"{len(running)} queued {len(todo)} | {steps}")
        time.sleep(poll_s)
    for job in running:  # past the deadline: save and stop
        _stop(job, signal.SIGTERM)
    for job in running:
        try:
            job.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            _stop(job, signal.SIGKILL)
            job.proc.wait()
        job.log.close()
    stopped = [j.name for j in running]
    if stopped:
        out(f"study: deadline: stopped {stopped} (resume them with the same command)")
    return {"finished": [j.name for j in done], "failed": [j.name for j in failed],
            "stopped": stopped, "queued": [j.name for j in todo], "skipped": skipped}


def mean_bias_by_model(analyses: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per model: the median μ-to-residual ratio of its linear layers' inputs and output
    gradients, from tools/analyze_mean_bias.py CSVs (the last step in each)."""
    import csv

    import numpy as np

    out = {}
    for model, path in analyses.items():
        with open(path, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"{path}: no rows; is it a tools/analyze_mean_bias.py CSV?")
        last = max(int(r["step"]) for r in rows)
        ratios = {op: [float(r["mean_to_residual"]) for r in rows
                       if int(r["step"]) == last and r["operand"] == op] for op in ("input", "grad")}
        out[model] = {f"{op}_median": float(np.median(v)) if v else float("nan")
                      for op, v in ratios.items()}
        out[model]["step"] = last
    return out


def pick_model(stats: dict[str, dict[str, float]]) -> str:
    """The model whose inputs carry the largest mean relative to their residual (the operands
    where the split removes most error; gradient means are an order of magnitude smaller)."""
    return max(stats, key=lambda m: stats[m]["input_median"])


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"a pair looks like RECIPE_A:RECIPE_B, got {text!r}")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    la = sub.add_parser("launch", help="run recipe x seed jobs on the GPUs of this machine")
    la.add_argument("--model", nargs="+", required=True, help="model preset(s)")
    la.add_argument("--recipes", nargs="+", required=True)
    la.add_argument("--seeds", nargs="+", type=int, required=True)
    la.add_argument("--gpus", nargs="+", type=int, default=[0])
    la.add_argument("--per-gpu", type=int, default=1, help="concurrent runs per GPU")
    la.add_argument("--out-dir", required=True)
    la.add_argument("--deadline-min", type=float, default=1e9,
                    help="stop (with a checkpoint) jobs still running after this many minutes")
    la.add_argument("--port-base", type=int, default=29600)
    la.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for every run")
    pm = sub.add_parser("pick-model", help="the model with the largest input mean-to-residual "
                        "ratio, from tools/analyze_mean_bias.py CSVs")
    pm.add_argument("analyses", nargs="+", metavar="MODEL=CSV")
    pm.add_argument("--out", default=None, help="also write the table as JSON")
    su = sub.add_parser("summarize", help="loss per recipe over seeds and paired comparisons")
    su.add_argument("runs", nargs="+",
                    help="run directories or metrics.jsonl files, or a directory of run directories")
    su.add_argument("--baseline", default="bf16")
    su.add_argument("--model", default=None,
                    help="only the runs of this model preset (a study directory may hold several)")
    su.add_argument("--pairs", nargs="*", type=_pair, default=[],
                    help="RECIPE_A:RECIPE_B paired by seed, e.g. averis:nvfp4-nohadamard")
    su.add_argument("--last-percent", type=float, default=10.0)
    su.add_argument("--until-step", type=int, default=None,
                    help="compare at this step (runs cut short by a deadline): losses up to it")
    su.add_argument("--out", default=None, help="write OUT.md (the tables) and OUT.png (curves)")
    return p


def _run_dirs(paths: list[str]) -> list[str]:
    dirs = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path!r} does not exist; give run directories or their parent")
        if os.path.isfile(path) or os.path.isfile(os.path.join(path, "metrics.jsonl")):
            dirs.append(path)  # a metrics.jsonl file, or a run directory
        else:
            dirs += sorted(os.path.join(path, d) for d in os.listdir(path)
                           if os.path.isfile(os.path.join(path, d, "metrics.jsonl")))
    if not dirs:
        raise FileNotFoundError(f"no run directories (with metrics.jsonl) under {paths}")
    return dirs


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "launch":
        extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
        if a.per_gpu < 1:
            raise SystemExit("--per-gpu must be >= 1")
        from megatron_averis.recipes import canonical_name

        a.recipes = [canonical_name(r) for r in a.recipes]  # an unknown name fails here
        jobs = plan(a.model, a.recipes, a.seeds, a.out_dir)
        report = launch(jobs, a.gpus, a.per_gpu, extra, a.deadline_min * 60, a.port_base)
        print(json.dumps(report, indent=1))
        return 1 if report["failed"] else 0
    if a.command == "pick-model":
        pairs = [x.partition("=") for x in a.analyses]
        if any(not sep for _, sep, _ in pairs):
            raise SystemExit("pick-model takes MODEL=CSV arguments")
        stats = mean_bias_by_model({m: path for m, _, path in pairs})
        choice = pick_model(stats)
        for m, st in stats.items():
            print(f"{m}: median mean-to-residual, inputs {st['input_median']:.4f}, "
                  f"gradients {st['grad_median']:.4f} (step {st['step']})", file=sys.stderr)
        if a.out:
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump({"chosen": choice, "models": stats}, f, indent=1)
        print(choice)
        return 0
    from megatron_averis.diagnostics.compare import require_matplotlib
    from megatron_averis.diagnostics.runs import load_run
    from megatron_averis.diagnostics.seeds import plot_seed_study, summary_markdown

    runs = [load_run(d) for d in _run_dirs(a.runs)]
    if a.model:
        runs = [r for r in runs if r.info.get("model_preset") == a.model]
        if not runs:
            raise SystemExit(f"no runs of model {a.model!r} under {a.runs}")
    text = summary_markdown(runs, a.baseline, a.pairs, a.last_percent, a.until_step)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".md", "w", encoding="utf-8") as f:
            f.write(text)
        require_matplotlib()
        plot_seed_study(runs, a.baseline, a.pairs, a.out + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
