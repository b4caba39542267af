#!/usr/bin/env python3
"""Keep a container's GPU stack (torch, Transformer Engine, apex, CUDA wheels, numpy) untouched.

    pin_base.py freeze PINS    write `name==version` for every installed GPU-stack distribution
    pin_base.py verify PINS    exit 1, naming each one, if any pinned distribution changed
    pin_base.py has NAME MIN   exit 0 if distribution NAME is installed at version >= MIN
                               (the Dockerfile builds Transformer Engine when the image's is older)

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


def release(version: str) -> tuple[int, ...]:
    """(major, minor, ...) of a version string; pre-release and local tails ignored."""
    out = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        out.append(int(digits.group()))
    return tuple(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("freeze", "verify", "has"))
    p.add_argument("pins", help="constraints file (has: the distribution name)")
    p.add_argument("minimum", nargs="?", help="has: the lowest acceptable version")
    a = p.parse_args(argv)
    env = installed()
    if a.action == "has":
        if a.minimum is None:
            p.error("has needs NAME MIN")
        version = env.get(normalize(a.pins))
        ok = version is not None and release(version) >= release(a.minimum)
        print(f"{a.pins} {version or 'not installed'}: {'ok' if ok else 'needs'} >= {a.minimum}")
        return 0 if ok else 1
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
