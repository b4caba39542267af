#!/usr/bin/env python3
"""Loss curves of runs in one PNG and the relative loss-gap table: see
megatron_averis.diagnostics.compare and docs/tools.md."""

import os
import sys

# Run from a checkout without installing: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_averis.diagnostics.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
