"""Tests of the Transformer Engine adapter. Helpers (te_cases.py) live beside this file."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
