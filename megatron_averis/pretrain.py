"""`python -m megatron_averis.pretrain --help`: GPT pretraining on megatron-core (see docs/training.md).

Launch with torchrun for several processes (one per GPU), e.g.
    torchrun --nproc-per-node 4 -m megatron_averis.pretrain --model-preset qwen3-0.6b ...

Imports happen under the __main__ guard: megatron-core's checkpoint writer starts helper
processes that re-import this module, and they need none of the training stack.
"""

if __name__ == "__main__":
    import sys
    import warnings

    # This program runs without Transformer Engine and apex by design (megatron-core falls back to
    # its own implementations); megatron-core would warn about it once per module and rank.
    warnings.filterwarnings(
        "ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")

    from megatron_averis.training.loop import main

    sys.exit(main())
