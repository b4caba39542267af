#!/usr/bin/env python3
"""Keep a container's GPU stack (torch, Transformer Engine, apex, CUDA wheels, numpy) untouched.

    pin_base.py freeze PINS    write `name==version` for every installed GPU-stack distribution
    pin_base.py verify PINS    exit 1, naming each one, if any pinned distribution changed

The Dockerfile passes PINS to pip as a constraints file (`pip install -c PINS ...`), so pip can add
packages but refuses to replace the image's builds, and verifies after every install step.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys

# Distributions that belong to the image's CUDA / PyTorch build (PEP 503-normalized names).
PINNED_NAMES = {"torch", "torchvision", "torchaudio", "triton", "pytorch-triton", "apex", "numpy",
                "nvfuser", "cupy"}
PINNED_PREFIXES = ("transformer-engine", "flash-attn", "nvidia-", "cuda-", "tensorrt", "cupy-")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_pinned(name: str) -> bool:
    n = normalize(name)
    return n in PINNED_NAMES or n.startswith(PINNED_PREFIXES)


def installed() -> dict[str, str]:
    """{normalized name: version} of the environment's distributions."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out[normalize(name)] = dist.version
    return out


def pins(env: dict[str, str]) -> dict[str, str]:
    return {n: v for n, v in sorted(env.items()) if is_pinned(n)}


def read_pins(path: str) -> dict[str, str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                out[normalize(name)] = version
    return out


def changed(expected: dict[str, str], env: dict[str, str]) -> list[str]:
    return [f"{n}: image had {v}, now {env.get(n, 'not installed')}"
            for n, v in expected.items() if env.get(n) != v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("freeze", "verify"))
    p.add_argument("pins", help="constraints file")
    a = p.parse_args(argv)
    env = installed()
    if a.action == "freeze":
        found = pins(env)
        if "torch" not in found:
            print("pin_base.py: torch is not installed; build on an image that ships PyTorch "
                  "(e.g. an NGC PyTorch image)", file=sys.stderr)
            return 1
        with open(a.pins, "w", encoding="utf-8") as f:
            f.write("# GPU stack of the base image; pip must not replace these\n")
            f.writelines(f"{n}=={v}\n" for n, v in found.items())
        print(f"pinned {len(found)} distributions (torch {found['torch']})")
        return 0
    diffs = changed(read_pins(a.pins), env)
    if diffs:
        print("the install replaced parts of the base image's GPU stack:\n  " + "\n  ".join(diffs)
              + "\ninstall the offending package with --no-deps, or pick a base image whose "
              "versions satisfy it", file=sys.stderr)
        return 1
    print("base image's GPU stack unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
