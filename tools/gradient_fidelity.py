#!/usr/bin/env python3
"""Full-model gradient of checkpoints under each FP4 recipe against a BF16 (or FP32) reference:
see megatron_averis.diagnostics.gradient_fidelity and docs/tools.md."""

import os
import sys

# Run from a checkout without installing: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_averis.diagnostics.gradient_fidelity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
