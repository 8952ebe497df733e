"""Host-side helpers shared by the Triton launchers of every op: dtypes, launch sizes, strides, devices.

One home for what each op file would otherwise repeat. Nothing here launches a kernel; the helpers read
shapes, strides, dtypes and device properties only (no host synchronisation). Launch plans take their
target from ``launch_target(device)`` (``incrementer_fast._dispatch``): a CUDA device's own properties, or
the selected plan (interpreter, h100, h200) for CPU tensors.
"""
from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from incrementer_fast._dispatch import INTERPRET, Target, launch_target
# What the kernels accumulate in is what the reference computes in: one definition.
from incrementer_fast.reference.core import compute_dtype

__all__ = [
    "INTERPRET",
    "TL_DTYPE",
    "Target",
    "UPCAST_BF16_DOTS",
    "compute_dtype",
    "completion_counter",
    "reset_completion_counters",
    "device_guard",
    "launch_target",
    "merge_dims",
    "num_warps",
    "pow2_tile",
    "split_fp32",
    "tl_dtype",
    "two_dims",
]

# Triton's interpreter computes bf16 tl.dot wrongly (seen with Triton 3.8): when the kernels run there, the
# launchers upcast bf16 dot operands to fp32 (the same exact products, see kernels/cosine_mask.py). Read at
# each launch; the performance ledger sets it False to count the 16-bit dots a GPU issues (whose values it
# does not check). It changes a dtype, not a launch plan: the same kernel lines run either way.
UPCAST_BF16_DOTS = INTERPRET

TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}



def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    return TL_DTYPE[dtype]


def num_warps(tile_elements: int, elements_per_thread: int) -> int:
    """4 or 8 warps: 8 once a tile holds more than ``elements_per_thread`` values per thread at 4 warps.

    Each op states its own budget (registers per thread it is willing to spend on one tile).
    """
    return 8 if tile_elements >= 8 * 32 * elements_per_thread else 4


def pow2_tile(size: int, candidates=(64, 32, 16, 8), max_padding: float = 1.3) -> int:
    """The largest power-of-two tile in ``candidates`` (largest first) whose whole tiles cover ``size`` with at
    most ``max_padding`` × the work; when none does, the one that pads least (the larger on ties).

    E.g. 151 classes → 64 (192 lanes, 1.27×), 21 → 8 (24, 1.14×), 1024 → 64 (exact); 21 among (32, 16) → 32.
    """
    for tile in candidates:
        if triton.cdiv(size, tile) * tile <= max_padding * size:
            return tile
    return min(candidates, key=lambda tile: (triton.cdiv(size, tile) * tile, -tile))


def merge_dims(shape, *strides) -> list[tuple[int, tuple[int, ...]]]:
    """Merge adjacent dims that are contiguous with each other in every tensor: [(size, (stride per tensor))].

    ``shape`` is the common logical shape, ``strides`` one stride tuple per tensor. Dims of size 1 are
    dropped; dim i merges into the group of dim i + 1 when, in every tensor, stride[i] equals that group's
    stride times its size. Returned outermost first; [] when every dim has size 1.
    """
    groups: list[tuple[int, tuple[int, ...]]] = []
    for dim in reversed(range(len(shape))):
        size = shape[dim]
        if size == 1:
            continue
        dim_strides = tuple(s[dim] for s in strides)
        if groups and all(o == i * groups[-1][0] for o, i in zip(dim_strides, groups[-1][1])):
            groups[-1] = (groups[-1][0] * size, groups[-1][1])
        else:
            groups.append((size, dim_strides))
    return groups[::-1]


def two_dims(shape, *strides) -> tuple[int, bool, list[tuple[int, int]]] | None:
    """The dims of ``shape`` as at most two strided dims (outer, inner), shared by several tensors.

    Returns (inner size, whether two dims remain, [(outer stride, inner stride) per tensor]), or None when
    more than two remain after ``merge_dims`` (the caller then copies to contiguous memory). One remaining
    dim has outer stride 0 (and the kernels can skip the div/mod of the two-dim case).
    """
    groups = merge_dims(shape, *strides)
    if len(groups) > 2:
        return None
    if not groups:  # every dim has size 1: a single element
        return 1, False, [(0, 0) for _ in strides]
    inner_size, inner_strides = groups[-1]
    outer_strides = groups[0][1] if len(groups) == 2 else (0,) * len(strides)
    return inner_size, len(groups) == 2, list(zip(outer_strides, inner_strides))


def split_fp32(value: float) -> tuple[float, float]:
    """``value`` as hi + lo, both exactly representable in float32 (Triton passes Python floats as fp32), so a
    float64 kernel can rebuild the exact double as ``hi.to(fp64) + lo.to(fp64)``."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def device_guard(device: torch.device):
    """Make ``device`` current for a launch. Triton launches on torch's *current* CUDA device and its current
    stream, not on the device of the tensors it is given: without this, tensors on cuda:1 launched while
    cuda:0 is current run on the wrong GPU (illegal address). A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}
# The CPU's counter (Triton's interpreter runs programs one after another, on one "stream"), made once here so
# that no launch, real or planned on fake tensors, ever issues a torch op for it.
_CPU_COUNTER = torch.zeros(1, dtype=torch.int32)


@contextlib.contextmanager
def completion_counter(device: torch.device):
    """A zeroed int32 counter for a "last program done" reduction on the current stream of ``device``, as a
    context manager around the launch that uses it.

    The kernels that use it (one launch computes partials *and* their fixed-order sum) increment it once per
    program with an atomic, and the last program — the one that sees ``programs − 1`` — reads every
    partial in a fixed order and sets the counter back to 0 before it ends. So one counter per (device,
    stream) serves every later launch on that stream: launches on one stream run one after the other, and
    no launch leaves it non-zero. A launch that raises (Triton's interpreter can stop half-way through the
    programs) has the counter zeroed again on the way out. While a CUDA graph is being captured a fresh
    zeroed counter is made instead (its zero fill is then part of the graph), so that replays never share
    one with eager launches; a CUDA counter first asked for under a FakeTensorMode is not kept (it is fake).
    Integer atomics only: the reduction order, hence every bit of the result, does not depend on which
    program finishes last.
    """
    if device.type != "cuda":
        counter = _CPU_COUNTER
    elif torch.cuda.is_current_stream_capturing():
        yield torch.zeros(1, dtype=torch.int32, device=device)
        return
    else:
        key = (device, torch.cuda.current_stream(device).cuda_stream)
        counter = _COUNTERS.get(key)
        if counter is None:
            counter = torch.zeros(1, dtype=torch.int32, device=device)
            if type(counter) is torch.Tensor:  # not a fake tensor (made under a FakeTensorMode): those never run
                _COUNTERS[key] = counter
    try:
        yield counter
    except BaseException:
        counter.zero_()
        raise


def reset_completion_counters() -> None:
    """Zero every completion counter (the CPU's and each CUDA device's and stream's).

    For a harness that ran only part of a grid — the performance ledger interprets a sample of the programs
    of some launches (benchmarks/ledger_count.py, ``sample_programs``) — so that the "last program" of a
    later launch is found again. A complete launch never needs it.
    """
    _CPU_COUNTER.zero_()
    for counter in _COUNTERS.values():
        counter.zero_()
