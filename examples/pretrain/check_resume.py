#!/usr/bin/env python3
"""Compare a resumed run with the uninterrupted one, step by step, from their metrics.jsonl files.

    python3 examples/pretrain/check_resume.py runs/resume-a runs/resume-b [--rtol 0]

Prints, for every training step the resumed run logged (log every step: LOG_INTERVAL=1), the
loss, grad norm and LR of both and their relative difference, and the validation losses; exits
0 when all agree within --rtol (default 0: bit-identical), 1 otherwise.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from megatron_averis.training.writers import read_records  # noqa: E402


def records(run_dir: str, event: str) -> dict:
    """step -> record of `event`; a later launch's record of a step wins, and a last line cut off
    by a killed run is left out."""
    rows = {}
    for r in read_records(os.path.join(run_dir, "metrics.jsonl")):
        if r["event"] == event:
            rows[r["step"]] = r
    return rows


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", help="log dir of the uninterrupted run")
    p.add_argument("resumed", help="log dir of the run resumed from one of its checkpoints")
    p.add_argument("--rtol", type=float, default=0.0)
    args = p.parse_args(argv)
    worst = 0.0
    for event, keys in (("train", ("loss", "grad_norm", "lr")), ("valid", ("loss",))):
        try:
            ref, got = records(args.reference, event), records(args.resumed, event)
        except (OSError, ValueError) as e:
            print(f"check_resume: {e}", file=sys.stderr)
            return 2
        steps = sorted(set(ref) & set(got))
        if event == "train" and not steps:
            print("no common training steps: log every step (LOG_INTERVAL=1) in both runs")
            return 1
        for step in steps:
            diffs = {k: rel(ref[step][k], got[step][k]) for k in keys}
            worst = max(worst, *diffs.values())
            print(f"{event} step {step:>6}: " + "  ".join(
                f"{k} {ref[step][k]:.6g} vs {got[step][k]:.6g} (rel {diffs[k]:.1e})" for k in keys))
    ok = worst <= args.rtol
    print(f"largest relative difference {worst:.3e}: "
          + ("identical" if worst == 0 else ("within" if ok else "exceeds")
             + f" --rtol {args.rtol:g}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
