"""Which implementation runs an op: the Triton kernels or the plain-PyTorch reference.

By default ("auto") CUDA tensors take the Triton kernels and CPU tensors the reference, unless the
environment variable ``TRITON_INTERPRET=1`` was set before this package (and so Triton) was imported: then
the very same kernels run through Triton's interpreter on the CPU, which is how they are tested without a GPU.

``use_backend("reference" | "triton" | "auto")`` overrides that for a block, and ``INCREMENTER_FAST_BACKEND``
(read once, at import) sets the process's starting choice. Every op reads the choice when it runs — inside
its custom op, at run time — so a ``torch.compile``d graph follows a switch made between two of its calls
without recompiling: the custom op is opaque to the compiler and decides on each call.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Union

import torch

__all__ = ["BACKENDS", "ENV_VAR", "backend", "selected_backend", "use_backend"]

# Read once, at import: Triton itself reads the variable when it is imported, so a later change
# could not switch the kernels to the interpreter anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is a hard dependency on Linux, but keep `import incrementer_fast` working without it
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without triton wheels
    HAS_TRITON = False

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "INCREMENTER_FAST_BACKEND"


def _check_name(name, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError(f"{source} = 'triton', but triton cannot be imported on this machine "
                           "(pip install triton, or choose 'reference')")
    return name


# The choice is process-wide, not per thread (like torch.backends.cudnn.flags): autograd runs the backward
# of CUDA tensors on its own worker threads, which must see the choice the forward saw.
_selected: str = _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)
_source: str = ENV_VAR if _selected != "auto" else "default"


def selected_backend() -> str:
    """The current choice: ``"auto"``, ``"reference"`` or ``"triton"`` (see ``use_backend``)."""
    return _selected


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op of incrementer_fast on ``name`` inside the block (also usable as a decorator).

    Args:
        name: ``"reference"`` (the plain-PyTorch references on any device: the spec), ``"triton"`` (the
            Triton kernels: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before import)
            or ``"auto"`` (the default: Triton on CUDA, the reference on the CPU).

    The choice is process-wide and read by each op when it runs, forward and backward alike: keep the
    ``backward()`` inside the block to run both on one backend. Compiled graphs follow it at call time (the
    ops are opaque custom ops); enter the block outside the compiled function, not inside it.
    Choosing ``"triton"`` for tensors it cannot run on is a ``RuntimeError`` when an op meets them.

    Examples:
        >>> import torch, incrementer_fast as inc
        >>> p, c = torch.randn(2, 16, 8), torch.randn(2, 3, 8)
        >>> with inc.use_backend("reference"):
        ...     masks = inc.cosine_mask(p, c, scale=10.0)
        >>> inc.backend("cpu")  # outside the block: the default again
        'reference'
    """
    global _selected, _source
    _check_name(name, "use_backend(name)")
    previous = _selected, _source
    _selected, _source = name, f'use_backend("{name}")'
    try:
        yield
    finally:
        _selected, _source = previous


def backend(device: Optional[Union[torch.device, str]] = None) -> str:
    """``"triton"`` or ``"reference"``: the implementation the ops run now for tensors on ``device``.

    Args:
        device: a torch device (or its name); ``None`` means CUDA when available, else the CPU.

    Returns:
        The backend under the current choice (``use_backend``, ``INCREMENTER_FAST_BACKEND``, else "auto").

    Raises:
        RuntimeError: ``"triton"`` was chosen but cannot run on ``device`` (a CPU device without
            ``TRITON_INTERPRET=1`` set before import, or any device other than CUDA and the CPU).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if _selected == "reference":
        return "reference"
    kernels_run = HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and INTERPRET))
    if _selected == "triton":
        if not kernels_run:
            where = ("CPU tensors need TRITON_INTERPRET=1 set before incrementer_fast is imported"
                     if device.type == "cpu" else "they run on CUDA tensors (and on the CPU through the interpreter)")
            raise RuntimeError(f"{_source} chose the Triton kernels, which cannot run on {device.type} tensors: "
                               f"{where}; choose 'auto' or 'reference' instead")
        return "triton"
    return "triton" if kernels_run else "reference"
