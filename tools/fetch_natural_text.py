#!/usr/bin/env python3
"""Thin wrapper: see megatron_averis.data.cli.main_fetch_natural and docs/data.md."""

import os
import sys

# Run from a checkout without installing: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_averis.data.cli import main_fetch_natural  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_fetch_natural())
