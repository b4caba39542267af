"""Run a Python script as on a machine without Transformer Engine, even where TE is installed:

    python3 benchmarks/without_te.py SCRIPT [ARGS...]

Issue 18's BF16 baseline is measured without TE. Where TE is importable, megatron-core's local
layers still reach for parts of it (its fused Adam, its RoPE kernel), so a run that merely
passes --transformer-impl local is not a run without TE. A None entry in sys.modules makes
every `import transformer_engine...` fail with ModuleNotFoundError and importlib's find_spec
report it absent, exactly what both see when TE is not installed.
"""

from __future__ import annotations

import os
import runpy
import sys


def hide_transformer_engine() -> None:
    sys.modules["transformer_engine"] = None  # type: ignore[assignment]


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit(__doc__)
    hide_transformer_engine()
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python3 SCRIPT` sets it
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
