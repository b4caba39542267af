"""Whether Transformer Engine can be used, and the one error that says how to get it.

Nothing here imports TE at module load: the framework runs without it, and TE is looked up only
when a TE path is asked for.
"""

from __future__ import annotations

import importlib.util

# CustomRecipe with QuantizerRole roles and the custom-GEMM dispatch this adapter is written
# against; 2.20 is what the adapter was read against and tested with.
MIN_VERSION = (2, 20)
INSTALL_HINT = (
    "install Transformer Engine >= 2.20 for PyTorch into this environment (NGC PyTorch images "
    "ship it; on the project's Hopper machines use the kit in ../shared/te-hopper, see "
    "docs/transformer-engine.md), or run with --transformer-impl local"
)


class TransformerEngineMissing(RuntimeError):
    """A Transformer Engine path was requested but TE cannot be imported (or is too old)."""


def te_installed() -> bool:
    """TE's Python package is present (cheap: does not import it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_te(what: str = "--transformer-impl transformer_engine"):
    """Import transformer_engine.pytorch or raise TransformerEngineMissing naming the fix."""
    if not te_installed():
        raise TransformerEngineMissing(f"{what} needs Transformer Engine, which is not installed; "
                                       f"{INSTALL_HINT}")
    try:
        import transformer_engine
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import CustomRecipe  # noqa: F401
    except Exception as e:  # a broken install (missing .so, wrong torch) is as unusable as none
        raise TransformerEngineMissing(f"{what} needs Transformer Engine, but importing it failed "
                                       f"({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    version = getattr(transformer_engine, "__version__", "0")
    if _version_tuple(version) < MIN_VERSION:
        raise TransformerEngineMissing(f"{what} needs Transformer Engine >= "
                                       f"{'.'.join(map(str, MIN_VERSION))}, found {version}; "
                                       f"{INSTALL_HINT}")
    return te
