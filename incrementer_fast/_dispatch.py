"""Which implementation runs an op: the Triton kernels or the plain-PyTorch reference.

CUDA tensors always take the Triton kernels. CPU tensors take the reference, unless the environment
variable ``TRITON_INTERPRET=1`` was set before this package (and so Triton) was imported: then the very
same kernels run through Triton's interpreter, which is how the kernels are tested without a GPU.
"""
from __future__ import annotations

import os

import torch

# Read once, at import: Triton itself reads the variable when it is imported, so a later change
# could not switch the kernels to the interpreter anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is a hard dependency on Linux, but keep `import incrementer_fast` working without it
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without triton wheels
    HAS_TRITON = False


def backend(device: torch.device | str) -> str:
    """Return ``"triton"`` or ``"reference"``: the implementation that runs for tensors on ``device``."""
    device = torch.device(device)
    if not HAS_TRITON:
        return "reference"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and INTERPRET:
        return "triton"
    return "reference"
