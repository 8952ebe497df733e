#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install the pinned stack and the package into it.
# torch 2.14.1 + torchvision 0.29.1 are the pair that pip takes from local wheels on our machines and that
# timm can import together (PyPI torchvision fails beside the CPU-only torch 2.13 file).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# --no-compile: byte-compiling every module of torch's 5 GB took half of the install (107 s → 57 s here);
# Python compiles what it imports on first use instead. One pip call for the stack and the package: one
# resolution instead of two (95 s → 68 s here from an empty venv).
.venv/bin/python -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1 -e ".[test]"
# Liger-Kernel 0.5.2 without its dependencies, beside the package rather than in .venv: benchmarks/calibrate.py
# (and tests/test_calibrate.py) rebuild its published GPU benchmark rows with the kernels of that version.
if [ ! -d .liger-0.5.2/liger_kernel ]; then
  .venv/bin/python -m pip install -q --no-compile --no-deps --target .liger-0.5.2 liger-kernel==0.5.2
fi
