"""Which implementation runs an op, and which launch plan the kernels follow.

Every op has two implementations: the plain-PyTorch reference in ``incrementer_fast.reference`` (the spec;
autograd differentiates it) and the Triton kernels behind a custom op (forward and backward kernels). Each
public op calls ``backend(device)`` once, before the autograd boundary, and runs one or the other:

* ``"auto"`` (the default): CUDA tensors take the kernels, CPU tensors the reference — unless
  ``TRITON_INTERPRET=1`` was set before this package (and so Triton) was imported: then CPU tensors take the
  very same kernels through Triton's interpreter, which is how they are tested without a GPU.
* ``"reference"``: the reference on any device. ``"triton"``: the kernels, an error where they cannot run.

``use_backend(name)`` chooses for a block; ``INCREMENTER_FAST_BACKEND`` (read once, at import) is the
process's starting choice. ``torch.compile`` guards on the choice: a compiled function recompiles when it
changes, and never runs a path other than the one in effect.

Launch plans. The kernels' tiles, bands, class blocks and grid sizes are pure functions of the shapes, the
dtypes and a *target* (``Target``), computed when an op runs: a CUDA tensor's own GPU (its SM count); for
CPU tensors through the interpreter, the interpreter's plan (few, large tiles: it runs programs one after
another) or a named GPU's plan — exactly the tiles and grids that GPU would launch — chosen with
``use_backend("triton", plan="h100")`` for a block or ``INCREMENTER_FAST_PLAN=h100|h200|interpreter`` for
a process (read each time an op plans a launch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Iterator, Optional, Union

import torch

__all__ = ["BACKENDS", "ENV_VAR", "PLAN_ENV_VAR", "PLANS", "Target", "backend", "launch_target", "selected_backend",
           "use_backend"]

# Read once, at import: Triton itself reads the variable when it is imported, so a later change could not
# switch the kernels to the interpreter anyway. It decides whether the kernels *can* run on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is a hard dependency on Linux, but keep `import incrementer_fast` working without it
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without triton wheels
    HAS_TRITON = False

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "INCREMENTER_FAST_BACKEND"
PLAN_ENV_VAR = "INCREMENTER_FAST_PLAN"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a launch plan is made for.

    Attributes:
        name: ``"interpreter"``, ``"h100"``, ``"h200"``, or a CUDA device's name.
        multiprocessors: SMs the grid-filling tile choices aim to keep busy.
        gpu: GPU tile shapes (programs run side by side, registers are the limit); False for the
            interpreter's plan (programs run one after another at Python speed: the fewest, largest tiles).
    """

    name: str
    multiprocessors: int
    gpu: bool


# The named plans. SM counts from NVIDIA's datasheets: H100 SXM5 132, H200 132 (both GH100 with 132 SMs
# enabled), so the two plans launch the same tiles and grids; the interpreter's plan is a one-SM target.
PLANS = {
    "interpreter": Target("interpreter", 1, gpu=False),
    "h100": Target("h100", 132, gpu=True),
    "h200": Target("h200", 132, gpu=True),
}


def _check_name(name, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError(f"{source} = 'triton', but triton cannot be imported on this machine "
                           "(pip install triton, or choose 'reference')")
    return name


def _check_plan(plan, source: str) -> str:
    if plan not in PLANS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, PLANS))}, got {plan!r}")
    return plan


# The choice is process-wide, not per thread (like torch.backends.cudnn.flags): autograd runs the backward
# of CUDA tensors on its own worker threads, which must see the choice the forward saw.
_selected: str = _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)
_source: str = ENV_VAR if _selected != "auto" else "default"
_plan: Optional[str] = None  # set by use_backend(plan=...); None: INCREMENTER_FAST_PLAN, else "interpreter"


def selected_backend() -> str:
    """The current choice: ``"auto"``, ``"reference"`` or ``"triton"`` (see ``use_backend``)."""
    return _selected


@contextlib.contextmanager
def use_backend(name: str, plan: Optional[str] = None) -> Iterator[None]:
    """Run every op of incrementer_fast on ``name`` inside the block (also usable as a decorator).

    Args:
        name: ``"reference"`` (the plain-PyTorch references on any device: the spec), ``"triton"`` (the
            Triton kernels: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before import)
            or ``"auto"`` (the default: Triton on CUDA, the reference on the CPU).
        plan: the launch plan of kernels on CPU tensors (through the interpreter): ``"interpreter"``, or
            ``"h100"`` / ``"h200"`` to run exactly the tiles and grids of that GPU. ``None`` keeps the
            plan in effect (``INCREMENTER_FAST_PLAN``, else ``"interpreter"``). CUDA tensors always follow
            their own GPU.

    The choice is process-wide and read by each op when its forward runs; the backward follows the forward's
    choice (the reference's through autograd, the kernels' through their backward op), inside the block or
    not. Compiled graphs guard on it (a change recompiles); enter the block outside the compiled function,
    not inside it.
    Choosing ``"triton"`` for tensors it cannot run on is a ``RuntimeError`` when an op meets them.

    Examples:
        >>> import torch, incrementer_fast as inc
        >>> p, c = torch.randn(2, 16, 8), torch.randn(2, 3, 8)
        >>> with inc.use_backend("reference"):
        ...     masks = inc.cosine_mask(p, c, scale=10.0)
        >>> inc.backend("cpu")  # outside the block: the default again
        'reference'
    """
    global _selected, _source, _plan
    _check_name(name, "use_backend(name)")
    if plan is not None:
        _check_plan(plan, "use_backend(plan)")
    previous = _selected, _source, _plan
    _selected, _source = name, f'use_backend("{name}")'
    if plan is not None:
        _plan = plan
    try:
        yield
    finally:
        _selected, _source, _plan = previous


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
    if _selected == "triton":
        check_kernels_run(device, _source)
        return "triton"
    return "triton" if _kernels_run(device) else "reference"


def _kernels_run(device: torch.device) -> bool:
    return HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and INTERPRET))


def check_kernels_run(device: torch.device, source: str = "the Triton op") -> None:
    """Raise a RuntimeError naming ``source`` when the kernels cannot run on ``device`` tensors."""
    if not _kernels_run(device):
        where = ("CPU tensors need TRITON_INTERPRET=1 set before incrementer_fast is imported"
                 if device.type == "cpu" else "they run on CUDA tensors (and on the CPU through the interpreter)")
        raise RuntimeError(f"{source} chose the Triton kernels, which cannot run on {device.type} tensors: "
                           f"{where}; choose 'auto' or 'reference' instead")


def selected_plan() -> str:
    """The launch plan of kernels on CPU tensors: ``use_backend(plan=...)``, else ``INCREMENTER_FAST_PLAN``,
    else ``"interpreter"``."""
    if _plan is not None:
        return _plan
    return _check_plan(os.environ.get(PLAN_ENV_VAR, "").strip().lower() or "interpreter", PLAN_ENV_VAR)


def launch_target(device: torch.device) -> Target:
    """The target a launch on ``device`` tensors is planned for: a CUDA device's own properties, else the
    selected plan (``selected_plan``). Called by the launchers each time they plan, inside the custom ops."""
    if device.type == "cuda":
        return _cuda_target(device)
    return PLANS[selected_plan()]


@functools.lru_cache(maxsize=None)
def _cuda_target(device: torch.device) -> Target:
    properties = torch.cuda.get_device_properties(device)
    return Target(properties.name, properties.multi_processor_count, gpu=True)
