"""Runs `python -m megatron_averis.pretrain` under torchrun (gloo, CPU) and reads back its metrics."""

import os
import socket
import subprocess
import sys

from megatron_averis.training.writers import read_records

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_args(corpus) -> list[str]:
    return ["--tokenizer-model", corpus["tokenizer_model"], "--train-data-path", corpus["train_prefix"],
            "--valid-data-path", corpus["valid_prefix"], "--num-workers", "0"]


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, log_dir: str):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.log_dir = log_dir

    def records(self, event: str | None = None) -> list[dict]:
        rows = read_records(os.path.join(self.log_dir, "metrics.jsonl"))
        return [r for r in rows if event is None or r["event"] == event]

    def by_step(self, event: str) -> dict:
        return {r["step"]: r for r in self.records(event)}


def command(args: list[str], *, nproc: int, log_dir: str) -> tuple[list[str], dict]:
    """(argv, environment) of torchrun --nproc-per-node `nproc` -m megatron_averis.pretrain ARGS
    --log-dir LOG_DIR."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "megatron_averis.pretrain", *args, "--log-dir", log_dir]
    return cmd, env


def launch(args: list[str], *, nproc: int, log_dir: str, timeout: int = 240, returncode: int = 0,
           preexec_fn=None) -> Run:
    """Run the program to its end; it must exit with `returncode`."""
    cmd, env = command(args, nproc=nproc, log_dir=log_dir)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)
    run = Run(proc, log_dir)
    if proc.returncode != returncode:
        raise AssertionError(f"pretrain exited with {proc.returncode}, not {returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return run
