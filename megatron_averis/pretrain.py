"""`python -m megatron_averis.pretrain --help`: GPT pretraining on megatron-core (see docs/training.md).

Launch with torchrun for several processes (one per GPU), e.g.
    torchrun --nproc-per-node 4 -m megatron_averis.pretrain --model-preset qwen3-0.6b ...
"""

import sys

from megatron_averis.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
