#!/usr/bin/env python3
"""Mean-bias statistics of every linear layer of checkpoints: see
megatron_averis.diagnostics.analyze and docs/tools.md."""

import os
import sys

# Run from a checkout without installing: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_averis.diagnostics.analyze import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
