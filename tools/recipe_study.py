#!/usr/bin/env python3
"""Recipe x seed training runs packed onto one machine's GPUs, and their summary over seeds:
see megatron_averis.diagnostics.study and docs/results.md."""

import os
import sys

# Run from a checkout without installing: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_averis.diagnostics.study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
