"""The fast paths a run takes, decided at start-up: the full-iteration CUDA graph
(--cuda-graph-impl, training/cuda_graph.py) and the fused elementwise ops (megatron/fusions.py).

--cuda-graph-impl none is the default, as in Megatron-LM. `local` asks for the graph and refuses,
each with its fix, what one graph cannot capture. `auto` (what examples/pretrain passes) takes
the graph wherever the run allows one and otherwise stays eager. Every fast path a run asked for
and does not get is one line of `execution_notes`, printed at start-up and by --dry-run.
Shapes never change within a run (--seq-length, --micro-batch-size and the micro-batch count
are fixed), so dynamic shapes are no reason to stay eager here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CUDA_GRAPH_IMPLS = ("none", "local", "auto")


@dataclass(frozen=True)
class Blocker:
    """Something in the run that one captured iteration cannot hold."""

    reason: str  # what, and why it cannot be captured
    fix: str     # the change that allows the capture


def cuda_graph_blockers(args) -> list[Blocker]:
    """Why this run's iterations cannot be captured as one CUDA graph (empty: they can)."""
    found = []
    if not torch.cuda.is_available():
        found.append(Blocker("no CUDA device (CPU run)", "run on a GPU"))
    if args.pipeline_model_parallel_size > 1:
        found.append(Blocker("pipeline parallelism (its point-to-point transfers synchronize with "
                             "the host)", "use --pipeline-model-parallel-size 1"))
    if args.recompute_granularity is not None:
        found.append(Blocker(f"--recompute-granularity {args.recompute_granularity} (activation "
                             "recomputation swaps RNG states on the host)",
                             "drop --recompute-granularity / --recompute-activations"))
    if args.overlap_grad_reduce:
        found.append(Blocker("--overlap-grad-reduce (its per-bucket reductions are launched from "
                             "host-side hooks)", "drop --overlap-grad-reduce"))
    if args.distributed_backend == "gloo" and torch.cuda.is_available():
        found.append(Blocker("--distributed-backend gloo (its collectives copy through the host)",
                             "use --distributed-backend nccl"))
    return found


def resolve(args) -> list[str]:
    """Decide --cuda-graph-impl (auto becomes local or none) and fill args.execution_notes;
    returns the problems of an explicit --cuda-graph-impl local."""
    problems, notes = [], []
    impl = args.cuda_graph_impl
    if impl != "none" and args.cuda_graph_warmup_steps < 1:
        problems.append(f"--cuda-graph-warmup-steps must be >= 1, got {args.cuda_graph_warmup_steps}")
    blockers = cuda_graph_blockers(args) if impl != "none" else []
    if impl == "local":
        problems += [f"--cuda-graph-impl local is refused: {b.reason}; drop --cuda-graph-impl "
                     f"local or {b.fix}" for b in blockers]
    elif impl == "auto":
        if args.transformer_impl == "transformer_engine":
            # Not refused under `local`, but never run in graph mode here: no silent default.
            blockers.append(Blocker("--transformer-impl transformer_engine (not verified under a "
                                    "full-iteration graph here)",
                                    "pass --cuda-graph-impl local to try it"))
        args.cuda_graph_impl = "none" if blockers else "local"
        if blockers:
            notes.append("eager mode, no CUDA graph (--cuda-graph-impl auto): " + "; ".join(
                f"{b.reason}, to capture: {b.fix}" for b in blockers))
        else:
            notes.append(f"CUDA graph (--cuda-graph-impl auto): each iteration is captured after "
                         f"{args.cuda_graph_warmup_steps} eager warm-up steps and replayed; "
                         "--cuda-graph-impl none for eager steps")
    from megatron_averis.megatron.fusions import Fusions  # loads megatron-core: not at --help

    notes += Fusions.from_flags(args).off_reasons(on_gpu=torch.cuda.is_available(), bf16=args.bf16)
    args.execution_notes = notes
    return problems

