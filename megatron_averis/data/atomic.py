"""Temporary names for atomic output: write beside the target, then rename."""

import os
import secrets


def temp_path(path: str) -> str:
    """A fresh name in the target's folder (so ``os.replace`` is atomic)."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def remove_quietly(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
