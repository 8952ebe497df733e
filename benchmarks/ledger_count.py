"""The counters of the performance ledger: what each launch moves and computes, counted on the CPU.

Two instruments, used together (``benchmarks/ledger.py`` drives them):

* ``KernelCounter`` — Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``) while the
  interpreter's builder (``triton.runtime.interpreter.interpreter_builder``, an ``InterpreterBuilder``) is
  instrumented: every builder call a kernel issues is counted as the kernel issues it, with no knowledge
  of any particular kernel. Per launch (one ``GridExecutor`` call):

  - ``bytes_read`` / ``bytes_written``: every *active* lane (mask true) of every load and store, times
    its element size; atomics count one element per active lane as written (a read-modify-write at the
    memory side). No cache model: a value loaded twice counts twice.
  - ``distinct_bytes_read`` / ``_written``: the same accesses attributed to the tensors the launch was
    given (by address), each tensor capped at its storage's size: the traffic a perfect cache would leave
    (a lower bound; a part of a tensor accessed repeatedly counts up to the whole tensor).
  - ``dot_flops`` by operand precision (``fp32_ieee``, ``fp32_tf32``, ``fp32_tf32x3``, ``bf16``, ``fp16``,
    ``fp64``...): 2·M·N·K of every ``tl.dot`` at the tile sizes issued, padding included;
    ``useful_dot_flops``: 2 × the multiply-adds whose two operands are both non-zero (padding lanes are
    loaded as 0, so they drop out; so do the structural zeros of a sparse operand).
  - ``lane_ops`` by kind (float, int, compare/select, convert, reduce, int_divmod): one per element of
    the result of every elementwise builder call (masked lanes included: SIMT lanes compute them too),
    reductions one per element reduced; ``transcendental_ops`` (exp, exp2, log, log2, sqrt, rsqrt, sin,
    cos, erf and floating division) apart, not in ``lane_ops``.
  - ``load_calls``: ``tl.load`` calls of all programs; ``load_sites``: the same per load site (a source line
    of the kernel or of a helper), whose largest value (``load_rounds``) counts the dependent memory round
    trips when the independent loads of one loop iteration are in flight together.
  - the grid (programs), the constexpr arguments (the tile sizes that were counted), num_warps, and
    ``num_args`` (the arguments the launch binds, constexprs included: host work per launch).
  - ``uncounted``: builder calls the instrument does not classify (new Triton features), by name, so a
    gap shows instead of hiding.

* ``AtenCounter`` — a ``TorchDispatchMode``: every aten op outside a Triton launch is a launch that reads
  its tensor inputs and writes its outputs (their distinct bytes: a stride-0 expanded dimension counts
  once; an argument passed twice, ``x.add_(x)``, is read once; the ops of ``GATHER_READS`` read only the
  elements they pick); views, allocations (``empty``) and metadata ops are free on the GPU
  (``record_host_ops``: kept as ``host`` launches, which cost host time only). FLOPs of matrix products come from
  ``torch.utils.flop_counter``'s formulas (``FlopCounterMode``'s registry); elementwise lane operations of
  aten ops are an estimate from the op's tags (pointwise: one per output element; reductions: one per
  input element; exp/log/div/softmax-like: transcendental). The fused ops' custom ops
  (``incrementer_fast::*``) are opened up: their implementation runs with the mode active, so the torch
  ops of the launchers (partial-sum reductions, zero fills) count as the launches they are, and the Triton
  kernels inside as Triton launches.
  It also tracks the live bytes of every storage allocated while it is active (``LiveBytes``), which gives
  the modelled peak memory.

Nothing here times anything on a GPU: every number is a count of what was issued on the CPU.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import inspect
import os
import random
import sys
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ledger_compile import compile_request

# ----------------------------------------------------------------------------- builder call classes
# Kinds of lane operations; transcendentals are kept apart (they run on the SFU, at a lower rate).
_FLOAT = ("fadd", "fsub", "fmul", "fneg", "fma", "fabs", "floor", "ceil", "minimumf", "minnumf", "maximumf",
          "maxnumf", "clampf")
_INT = ("add", "sub", "mul", "shl", "lshr", "ashr", "and", "or", "xor", "minsi", "minui", "maxsi", "maxui",
        "iabs", "umulhi", "addptr")
_COMPARE = tuple(f"icmp{c}" for c in ("SLE", "SLT", "SGE", "SGT", "ULE", "ULT", "UGE", "UGT", "EQ", "NE")) + \
    tuple(f"fcmp{c}" for c in ("OLT", "OGT", "OLE", "OGE", "OEQ", "ONE", "ULT", "UGT", "ULE", "UGE", "UEQ",
                               "UNE")) + ("select",)
_CONVERT = ("si_to_fp", "ui_to_fp", "fp_to_si", "fp_to_ui", "fp_ext", "fp_trunc", "int_cast", "fp_to_fp")
_INT_DIVMOD = ("sdiv", "udiv", "srem", "urem")
_TRANSCENDENTAL = ("exp", "exp2", "log", "log2", "sqrt", "precise_sqrt", "rsqrt", "sin", "cos", "erf", "fdiv",
                   "precise_divf", "frem")
# Layout and bookkeeping: no arithmetic on a GPU (register renaming, broadcasts, constants, indices).
_FREE = ("splat", "unsplat", "broadcast", "expand_dims", "reshape", "trans", "make_range", "cat", "join", "split",
         "get_program_id", "get_num_programs", "bitcast", "int_to_ptr", "ptr_to_int", "barrier", "assume",
         "assert", "print", "make_tensor_descriptor", "gather", "histogram", "idiv")

LANE_KINDS = {**{n: "float" for n in _FLOAT}, **{n: "int" for n in _INT}, **{n: "compare_select" for n in _COMPARE},
              **{n: "convert" for n in _CONVERT}, **{n: "int_divmod" for n in _INT_DIVMOD}}
TRANSCENDENTAL = set(_TRANSCENDENTAL)
MEMORY = ("load", "masked_load", "store", "masked_store", "atomic_rmw", "atomic_cas", "descriptor_load",
          "descriptor_store", "descriptor_gather", "descriptor_scatter")
DOT = ("dot", "dot_scaled")
FREE = set(_FREE)


def _element_bytes(tl_dtype) -> int:
    """Bytes of one element of a Triton scalar type (int1 is stored as a byte)."""
    while hasattr(tl_dtype, "element_ty"):
        tl_dtype = tl_dtype.element_ty
    return max(1, tl_dtype.primitive_bitwidth // 8)


def _dot_precision(a_handle, input_precision) -> str:
    """The precision class a tl.dot was issued in: its operand dtype, and for fp32 its input precision."""
    dtype = a_handle.dtype
    while hasattr(dtype, "element_ty"):
        dtype = dtype.element_ty
    name = str(dtype)  # fp32, bf16, fp16, fp64, int8, fp8e4nv...
    if name == "fp32":
        precision = getattr(input_precision, "name", str(input_precision)).lower()
        return f"fp32_{precision}"
    return name


# ----------------------------------------------------------------------------------- launch records
@dataclass
class Launch:
    """What one launch (a Triton grid or an aten op) read, wrote and computed."""

    kind: str  # "triton" | "aten"
    name: str
    phase: str  # "forward" | "backward" (set by the driver)
    grid: int = 1  # programs (1 for an aten op: the ledger does not model aten's own grids)
    config: dict = field(default_factory=dict)  # constexpr arguments (tile sizes) and num_warps
    bytes_read: int = 0
    bytes_written: int = 0
    distinct_bytes_read: int = 0  # per tensor argument, capped at its storage size: a perfect cache's traffic
    distinct_bytes_written: int = 0
    atomic_lanes: int = 0
    atomic_max_per_address: int = 0  # the most active lanes that hit one address in this launch (in the
    # programs interpreted: not scaled when only a sample of the grid ran)
    dot_flops: Counter = field(default_factory=Counter)  # precision -> FLOPs issued (2·M·N·K per tl.dot)
    useful_dot_flops: int = 0
    dot_shapes: Counter = field(default_factory=Counter)  # "MxNxK" -> number of tl.dot calls
    lane_ops: Counter = field(default_factory=Counter)  # kind -> lane operations
    transcendental_ops: int = 0
    load_calls: int = 0  # tl.load calls issued (all programs)
    load_sites: Counter = field(default_factory=Counter)  # "file:line" -> tl.load calls (all programs)
    reduce_calls: int = 0  # tl.reduce / tl.sum / scans issued (all programs): each a cross-thread step
    num_args: int = 0  # arguments bound by the launch (constexprs included)
    compile_request: dict | None = None  # ledger_compile's description of the launch (not in the JSON record)
    op_class: str = ""  # aten launches: "pointwise" (dense TensorIterator), "strided" (one operand is not), else ""
    uncounted: Counter = field(default_factory=Counter)  # builder calls the ledger does not classify
    interpreter_s: float = 0.0  # CPU seconds the interpreter spent in this launch (harness cost, not GPU time)
    # Programs actually interpreted, when only a sample of the grid ran (``KernelCounter(sample_programs=)``):
    # the counts are then that sample's, scaled by grid / sampled_programs — an estimate. 0: every program.
    sampled_programs: int = 0

    @property
    def load_rounds(self) -> int:
        """The busiest load site's calls (all programs): one round trip per loop iteration that loads."""
        return max(self.load_sites.values(), default=0)

    @property
    def flops(self) -> int:
        return sum(self.dot_flops.values())

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if out["compile_request"] is None:
            del out["compile_request"]
        for key in ("dot_flops", "dot_shapes", "lane_ops", "uncounted", "load_sites"):
            out[key] = dict(getattr(self, key))
        out["load_rounds"] = self.load_rounds
        return out


# ------------------------------------------------------------------------------- Triton instrument
class KernelCounter:
    """Counts what Triton kernels issue under the interpreter, one ``Launch`` per grid launch.

    A context manager: on entry it wraps the builder's methods on the interpreter's builder instance and
    ``GridExecutor.__call__`` / the interpreter's reduce and scan implementations; on exit it restores
    them. ``launches`` holds the records; ``in_kernel`` is true while a grid runs (the interpreter's own
    host copies of the arguments are then not the program's work).
    """

    def __init__(self, dry: bool = False, sample_programs: int = 0):
        import triton.runtime.interpreter as interpreter

        self._interpreter = interpreter
        # dry: record each launch's kernel, constexprs and grid without running a program (the launch plan
        # of a shape too large to interpret; the tensors may then be fake).
        self.dry = dry
        # sample_programs > 0: a launch of more programs than that interprets only a fixed pseudo-random sample
        # of them (seeded by the grid size) and scales its counts by grid / sample. For kernels whose
        # programs do near-identical work (bands of cells, tiles) at shapes too large to interpret in full
        # and which no exact extrapolation covers (ledger_scale). An estimate, recorded as such per launch;
        # the outputs of the skipped programs are left unwritten, so only counts that do not depend on
        # the data are meaningful downstream of such a launch.
        self.sample_programs = sample_programs
        self.launches: list[Launch] = []
        self.phase = "forward"
        self.current: Launch | None = None
        self._depth = 0  # builder calls made by other builder calls (create_load → create_masked_load) count once
        self._outermost = _Outermost(self)
        self._restore: list = []
        self._addresses: Counter | None = None
        self._begin_tensors((), {})

    @property
    def in_kernel(self) -> bool:
        return self.current is not None

    # -- installation
    def __enter__(self):
        builder = self._interpreter.interpreter_builder
        if not self._interpreter_active():
            raise RuntimeError("the ledger counts Triton kernels through the interpreter: set TRITON_INTERPRET=1 "
                               "before triton is imported (benchmarks/ledger.py does so itself)")
        for name in dir(type(builder)):
            if not name.startswith("create_"):
                continue
            op = name[len("create_"):]
            self._wrap_instance(builder, name, self._classify(op))
        self._wrap_instance(builder, "set_grid_dim", self._on_grid)
        executor = self._interpreter.GridExecutor
        self._wrap_class(executor, "__call__", self._on_launch)
        self._wrap_class(self._interpreter.ReduceOps, "apply_impl", self._on_reduce)
        self._wrap_class(self._interpreter.ScanOps, "apply_impl", self._on_reduce)
        return self

    def __exit__(self, *exc):
        while self._restore:
            self._restore.pop()()
        return False

    @staticmethod
    def _interpreter_active() -> bool:
        import triton

        knobs = getattr(triton, "knobs", None)
        if knobs is not None and hasattr(knobs, "runtime") and hasattr(knobs.runtime, "interpret"):
            return bool(knobs.runtime.interpret)
        import os

        return os.environ.get("TRITON_INTERPRET", "0") == "1"

    def _wrap_instance(self, obj, name, make_wrapper):
        if make_wrapper is None:
            return
        original = getattr(obj, name)  # bound method (class attribute or lambda)
        had_own = name in obj.__dict__
        saved = obj.__dict__.get(name)
        setattr(obj, name, make_wrapper(original, name))

        def restore():
            if had_own:
                setattr(obj, name, saved)
            else:
                delattr(obj, name)

        self._restore.append(restore)

    def _wrap_class(self, cls, name, make_wrapper):
        original = cls.__dict__[name]
        setattr(cls, name, make_wrapper(original, name))
        self._restore.append(lambda: setattr(cls, name, original))

    def _classify(self, op: str):
        if op in ("load", "masked_load"):
            return self._on_load
        if op in ("store", "masked_store"):
            return self._on_store
        if op in ("atomic_rmw", "atomic_cas"):
            return self._on_atomic
        if op in ("descriptor_load", "descriptor_gather"):
            return self._on_descriptor_load
        if op in ("descriptor_store", "descriptor_scatter"):
            return self._on_descriptor_store
        if op in DOT:
            return self._on_dot
        if op in TRANSCENDENTAL or op in LANE_KINDS:
            return self._on_lane_op
        if op in FREE:
            return None
        return self._on_unknown

    # -- the counting wrappers (``with self._outermost as count``: true for a call no other counted call made)

    def _on_grid(self, original, name):
        def wrapper(nx, ny, nz):
            if self.current is not None:
                self.current.grid = int(nx) * int(ny) * int(nz)
            return original(nx, ny, nz)

        return wrapper

    def _on_load(self, original, name):
        def wrapper(ptrs, *args, **kwargs):
            with self._outermost as count:
                result = original(ptrs, *args, **kwargs)
                if count:
                    self._access(ptrs, args[0] if name == "create_masked_load" else None, write=False)
                    self.current.load_calls += 1
                    self.current.load_sites[_kernel_site()] += 1
                return result

        return wrapper

    def _on_store(self, original, name):
        def wrapper(ptrs, value, *args, **kwargs):
            with self._outermost as count:
                result = original(ptrs, value, *args, **kwargs)
                if count:
                    self._access(ptrs, args[0] if name == "create_masked_store" else None, write=True)
                return result

        return wrapper

    def _on_atomic(self, original, name):
        def wrapper(*args, **kwargs):
            with self._outermost as count:
                result = original(*args, **kwargs)
                if count:
                    if name == "create_atomic_rmw":  # (rmwOp, ptr, val, mask, sem, scope)
                        ptr, mask = args[1], args[3]
                    else:  # (ptr, cmp, val, sem, scope)
                        ptr, mask = args[0], None
                    addresses = self._access(ptr, mask, write=True)
                    self.current.atomic_lanes += addresses.size
                    values, counts = np.unique(addresses, return_counts=True)
                    self._addresses.update(dict(zip(values.tolist(), counts.tolist())))
                return result

        return wrapper

    def _access(self, ptrs, mask, write: bool) -> np.ndarray:
        """Count the active lanes of one memory access; returns their addresses."""
        addresses = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            active = np.broadcast_to(np.asarray(mask.data), np.shape(ptrs.data)).reshape(-1)
            addresses = addresses[active]
        nbytes = addresses.size * _element_bytes(ptrs.dtype)
        if write:
            self.current.bytes_written += nbytes
        else:
            self.current.bytes_read += nbytes
        accessed = self._written if write else self._read
        if self._starts.size and addresses.size:
            index = np.searchsorted(self._starts, addresses, side="right") - 1
            inside = (index >= 0) & (addresses < self._ends[np.maximum(index, 0)])
            per_tensor = np.bincount(index[inside], minlength=self._starts.size) * _element_bytes(ptrs.dtype)
            accessed[: self._starts.size] += per_tensor
            accessed[-1] += int((~inside).sum()) * _element_bytes(ptrs.dtype)  # outside every argument
        else:
            accessed[-1] += nbytes
        return addresses

    def _begin_tensors(self, args, kwargs) -> None:
        """The storages of a launch's tensor arguments, sorted by address, for the distinct-bytes bound."""
        storages = {}
        for value in list(args) + list(kwargs.values()):
            value = getattr(value, "base", value)  # triton's TensorWrapper (a reinterpreted dtype)
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.nbytes():
                    storages[storage.data_ptr()] = storage.nbytes()
        starts = sorted(storages)
        position = {start: i for i, start in enumerate(starts)}
        self._argument_order = [position[start] for start in storages]  # first-argument order (dict order)
        self._starts = np.array(starts, dtype=np.uint64)
        self._ends = np.array([start + storages[start] for start in starts], dtype=np.uint64)
        self._sizes = np.array([storages[start] for start in starts] + [np.iinfo(np.int64).max], dtype=np.int64)
        self._read = np.zeros(len(starts) + 1, dtype=np.int64)  # the last slot: outside every argument
        self._written = np.zeros(len(starts) + 1, dtype=np.int64)

    def _end_tensors(self, record: Launch) -> None:
        record.distinct_bytes_read = int(np.minimum(self._read, self._sizes).sum())
        record.distinct_bytes_written = int(np.minimum(self._written, self._sizes).sum())
        # Per tensor argument (storage bytes, bytes read, bytes written; the last entry: accesses outside every
        # argument, size 0), for a cache model of repeated accesses (benchmarks/calibrate.py); not in the JSON.
        # In argument order, so that launches of one kernel at two sizes line up.
        order = self._argument_order + [len(self._argument_order)]
        sizes = [int(size) for size in self._sizes[:-1]] + [0]
        read, written = self._read.tolist(), self._written.tolist()
        record.tensor_traffic = [[sizes[i], read[i], written[i]] for i in order]

    def _on_descriptor_load(self, original, name):
        def wrapper(*args, **kwargs):
            with self._outermost as count:
                result = original(*args, **kwargs)
                if count:
                    nbytes = result.data.size * _element_bytes(result.dtype)
                    self.current.bytes_read += nbytes
                    self._read[-1] += nbytes  # tensor descriptors: not attributed to a tensor
                return result

        return wrapper

    def _on_descriptor_store(self, original, name):
        def wrapper(desc, value, *args, **kwargs):
            with self._outermost as count:
                result = original(desc, value, *args, **kwargs)
                if count:
                    nbytes = value.data.size * _element_bytes(value.dtype)
                    self.current.bytes_written += nbytes
                    self._written[-1] += nbytes
                return result

        return wrapper

    def _on_dot(self, original, name):
        def wrapper(*args, **kwargs):
            with self._outermost as count:
                result = original(*args, **kwargs)
                if count and name == "create_dot":  # (a, b, d, input_precision, max_num_imprecise_acc)
                    a, b, _, precision = args[:4]
                    a_data, b_data = a.data, b.data
                    m, k = a_data.shape[-2:]
                    n = b_data.shape[-1]
                    batch = int(np.prod(a_data.shape[:-2])) if a_data.ndim > 2 else 1
                    self.current.dot_flops[_dot_precision(a, precision)] += 2 * batch * m * n * k
                    self.current.dot_shapes[f"{m}x{n}x{k}"] += batch
                    nonzero_a = np.count_nonzero(a_data, axis=-2)  # (..., K): live rows per reduction index
                    nonzero_b = np.count_nonzero(b_data, axis=-1)  # (..., K): live columns per reduction index
                    self.current.useful_dot_flops += 2 * int((nonzero_a.astype(np.int64) * nonzero_b).sum())
                elif count:  # dot_scaled: operands are packed; count the issued tile only
                    self.current.uncounted[name] += 1
                return result

        return wrapper

    def _on_lane_op(self, original, name):
        op = name[len("create_"):]
        transcendental = op in TRANSCENDENTAL
        kind = LANE_KINDS.get(op)

        def wrapper(*args, **kwargs):
            with self._outermost as count:
                result = original(*args, **kwargs)
                if count:
                    lanes = int(np.size(result.data))
                    if transcendental:
                        self.current.transcendental_ops += lanes
                    else:
                        self.current.lane_ops[kind] += lanes
                return result

        return wrapper

    def _on_unknown(self, original, name):
        def wrapper(*args, **kwargs):
            with self._outermost as count:
                if count:
                    self.current.uncounted[name] += 1
                return original(*args, **kwargs)

        return wrapper

    def _on_reduce(self, original, name):
        # Reductions and scans are implemented by the interpreter in numpy (fast paths) or by calling the
        # combine function element by element (through the builder): count the reduced elements once here
        # and none of the combine calls.
        def wrapper(reducer, inputs):
            with self._outermost as count:
                result = original(reducer, inputs)
                if count:
                    lanes = sum(int(np.size(t.handle.data)) for t in inputs)
                    self.current.lane_ops["reduce"] += lanes
                    self.current.reduce_calls += 1
                return result

        return wrapper

    def _on_launch(self, original, name):
        counter = self

        def wrapper(executor, *args, **kwargs):
            record = Launch("triton", executor.fn.__name__, counter.phase, config=_launch_config(executor, args, kwargs))
            # what the GPU compiler would be given (ledger_compile prices registers and spills from it)
            record.compile_request = compile_request(executor.fn, args, kwargs)
            if counter.dry:
                record.grid = _grid_size(executor, args, kwargs)
                counter.launches.append(record)
                return None
            record.num_args = len(args) + sum(1 for k in kwargs if k not in LAUNCH_OPTIONS)
            counter.current, counter._addresses = record, Counter()
            counter._begin_tensors(args, kwargs)
            grid = _grid_size(executor, args, kwargs) if counter.sample_programs else 0
            sampled = counter.sample_programs if grid > counter.sample_programs > 0 else 0
            kernel = executor.fn
            if sampled:
                executor.fn = _only_programs(kernel, counter._interpreter.interpreter_builder,
                                             random.Random(grid).sample(range(grid), sampled))
            start = time.perf_counter()
            try:
                return original(executor, *args, **kwargs)
            finally:
                executor.fn = kernel
                record.interpreter_s = time.perf_counter() - start
                record.atomic_max_per_address = max(counter._addresses.values(), default=0)
                if sampled:
                    record.sampled_programs = sampled
                    _scale_counts(record, counter, Fraction(grid, sampled))
                counter._end_tensors(record)
                # The interpreter leaves reference cycles that would keep tensors alive until some later
                # garbage collection: free them now, as refcounting frees tensors on a GPU run.
                gc.collect()
                counter.current, counter._addresses = None, None
                counter.launches.append(record)

        return wrapper


def _only_programs(kernel, builder, programs):
    """``kernel`` run only for the flat program ids in ``programs`` (the grid's x fastest, as CUDA numbers them);
    the interpreter reads the kernel's arguments from its signature, which the wrapper carries."""
    chosen = set(programs)

    def run(**kwargs):
        x, y, z = builder.grid_idx
        nx, ny, _ = builder.grid_dim
        if x + nx * (y + ny * z) in chosen:
            return kernel(**kwargs)
        return None

    # The kernel's globals (the interpreter patches the triton.language it finds there), its signature (the
    # interpreter passes the arguments it names).
    wrapper = types.FunctionType(run.__code__, kernel.__globals__, kernel.__name__, None, run.__closure__)
    wrapper.__signature__ = inspect.signature(kernel)
    return wrapper


def _scale_counts(record: Launch, counter: "KernelCounter", factor: Fraction) -> None:
    """Scale a sampled launch's counts (and its per-tensor bytes, before the distinct-bytes cap) to its grid."""
    def scaled(value: int) -> int:
        return int(round(value * factor))

    for name in ("bytes_read", "bytes_written", "atomic_lanes", "useful_dot_flops", "transcendental_ops", "load_calls",
                 "reduce_calls"):
        setattr(record, name, scaled(getattr(record, name)))
    for name in ("dot_flops", "dot_shapes", "lane_ops", "uncounted", "load_sites"):
        counts = getattr(record, name)
        for key in counts:
            counts[key] = scaled(counts[key])
    counter._read = np.array([scaled(v) for v in counter._read], dtype=np.int64)
    counter._written = np.array([scaled(v) for v in counter._written], dtype=np.int64)


def _grid_size(executor, args, kwargs) -> int:
    """The number of programs a GridExecutor call would run, computed as the interpreter does."""
    names = set(inspect.getfullargspec(executor.fn).args)
    call_args = inspect.getcallargs(executor.fn, *args, **{k: v for k, v in kwargs.items() if k in names})
    grid = executor.grid(call_args) if callable(executor.grid) else executor.grid
    size = 1
    for dim in tuple(grid):
        size *= int(dim)
    return size


class _Outermost:
    """Context manager of the builder wrappers: is this call the outermost counted one, inside a grid?"""

    __slots__ = ("counter",)

    def __init__(self, counter: KernelCounter):
        self.counter = counter

    def __enter__(self) -> bool:
        counter = self.counter
        counter._depth += 1
        return counter._depth == 1 and counter.current is not None

    def __exit__(self, *exc) -> bool:
        self.counter._depth -= 1
        return False


# Frames inside the triton package (the interpreter, triton.language) are not kernel source lines. Found
# without importing triton (which must be imported after TRITON_INTERPRET is set).
_TRITON_DIR = os.path.dirname(importlib.util.find_spec("triton").origin) + os.sep
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "grid", "warmup", "enable_fp_fusion")


def _kernel_site() -> tuple:
    """The kernel source line ("file:line") that issued the current builder call: the innermost frame
    outside the triton package (the kernel's body or a ``@triton.jit`` helper's)."""
    frame = sys._getframe(2)
    while frame is not None and _TRITON_DIR in frame.f_code.co_filename:
        frame = frame.f_back
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}" if frame is not None else "?"


def _launch_config(executor, args, kwargs) -> dict:
    """The constexpr arguments of a launch (its tile sizes and switches) and num_warps, as JSON values."""
    try:
        bound = inspect.signature(executor.fn).bind_partial(*args, **{k: v for k, v in kwargs.items()
                                                                      if k in executor.arg_names})
    except TypeError:
        bound = None
    config = {}
    if bound is not None:
        for name in executor.constexprs:
            if name in bound.arguments:
                config[name] = _json_value(bound.arguments[name])
    for name in ("num_warps", "num_stages"):
        if name in kwargs:
            config[name] = kwargs[name]
    return config


def _json_value(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


# ---------------------------------------------------------------------------------- live bytes
class LiveBytes:
    """Bytes of the storages allocated while tracking that are still alive: the modelled memory in use.

    Storages are held through ``StorageWeakRef`` (no reference keeps them alive); ``sample()`` drops the
    dead ones and updates ``peak``. Storages that existed before tracking began (the inputs) are not
    counted: peaks are what the tracked code adds, as ``torch.cuda.max_memory_allocated`` minus the memory
    allocated before a call would be.
    """

    def __init__(self):
        self._refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._refs.get(key)
        if entry is not None and not entry[0].expired():
            return
        if entry is not None:
            self.current -= entry[1]
        nbytes = storage.nbytes()
        self._refs[key] = (StorageWeakRef(storage), nbytes)
        self.current += nbytes

    def sample(self) -> int:
        dead = [key for key, (ref, _) in self._refs.items() if ref.expired()]
        for key in dead:
            self.current -= self._refs.pop(key)[1]
        self.peak = max(self.peak, self.current)
        return self.current

    def reset_peak(self) -> int:
        """Start a new peak window at the current live bytes; returns them."""
        self.peak = self.sample()
        return self.peak


# ------------------------------------------------------------------------------------ aten instrument
# Ops that launch nothing on a GPU: allocation without initialisation, metadata, aliasing.
FREE_ATEN = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "lift_fresh", "detach",
    "alias", "_local_scalar_dense", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "record_stream",
    "_unsafe_view",  # a view that autograd does not track as one (matmul's reshapes): no kernel
}
# Ops that read one argument only where another picks (argument read → the tensor whose elements count the
# picked elements, "out" for the output, None: not read at all, only its shape is used).
GATHER_READS = {
    "nll_loss_forward": ("self", "target"), "nll_loss2d_forward": ("self", "target"),
    "nll_loss_backward": ("self", None), "nll_loss2d_backward": ("self", None),
    "gather": ("self", "index"), "index_select": ("self", "out"), "embedding": ("weight", "out"),
}
# Copies that run as TensorIterator kernels like the pointwise ops (their class: dense or strided operands).
COPY_LIKE_ATEN = {"_to_copy", "copy", "clone", "cat", "stack", "where", "masked_fill", "fill", "zero", "zeros_like",
                  "ones_like", "full_like"}
SOFTMAX_OPS = ("_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data")
SOFTMAX_SMEM_BYTES = 48 * 1024  # the default dynamic shared memory a block gets without opting in
# Ops that write their first argument without reading it.
WRITE_ONLY_FIRST = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}
TRANSCENDENTAL_ATEN = {
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "div", "reciprocal", "sigmoid",
    "tanh", "pow", "sin", "cos", "erf", "gelu", "_softmax", "_log_softmax", "logsumexp", "softmax",
    "log_softmax", "_softmax_backward_data", "_log_softmax_backward_data", "gelu_backward", "sigmoid_backward",
    "tanh_backward", "atan2", "erfinv", "silu",
}
REDUCTIONS_ATEN = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "logsumexp", "linalg_vector_norm",
                   "norm", "prod", "var", "std", "var_mean", "std_mean", "any", "all", "cumsum", "_softmax",
                   "_log_softmax", "native_layer_norm", "native_layer_norm_backward", "nll_loss_forward",
                   "nll_loss2d_forward"}


def _footprint(t: torch.Tensor) -> int:
    """Distinct bytes a tensor view covers: dimensions of stride 0 count once."""
    if t.numel() == 0:
        return 0
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    out = []
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return out


class AtenCounter(TorchDispatchMode):
    """Counts aten ops as launches, opens the fused custom ops and tracks live tensor bytes.

    ``kernels``: the active ``KernelCounter`` (aten calls made by the interpreter while a grid runs are
    the interpreter's host copies: not counted, not tracked). ``open_namespaces``: custom-op namespaces
    whose implementation runs under the mode (their inner ops are counted) when their tensors are real CPU
    tensors; with fake or meta tensors (no kernels to run) custom ops run their fake implementations and
    count as nothing but their allocations.
    """

    def __init__(self, kernels: KernelCounter | None = None, open_namespaces=("incrementer_fast",),
                 open_fake: bool = False, record_host_ops: bool = False):
        super().__init__()
        self.kernels = kernels
        # record_host_ops: the free ops (views, allocations, metadata) become ``host`` launches, which a
        # model of host time can price (they run no kernel but cost dispatcher time)
        self.record_host_ops = record_host_ops
        # open_fake: run the custom ops' CPU implementation on fake tensors too (with a dry KernelCounter:
        # the launchers' host code on shapes alone, for the launch plan of a large shape)
        self.open_fake = open_fake
        self.open_namespaces = set(open_namespaces)
        self.launches: list[Launch] = []
        self.live = LiveBytes()
        self.phase = "forward"
        self.custom_ops: Counter = Counter()
        self.syncs = 0  # .item() and friends: host synchronisations on a GPU

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (self.kernels is not None and self.kernels.in_kernel) or func.namespace == "prim":
            return func(*args, **kwargs)  # the interpreter's host copies; metadata queries (prim.device)
        if func.namespace in self.open_namespaces:
            self.custom_ops[func.name()] += 1
            tensors = _tensors((args, kwargs))
            on_cpu = all(t.device.type == "cpu" and (self.open_fake or not isinstance(t, FakeTensor)) for t in tensors)
            if on_cpu:
                with self:
                    out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
            else:
                out = func(*args, **kwargs)
                self._track_outputs(args, kwargs, out)
            self.live.sample()
            return out
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _track_outputs(self, args, kwargs, out):
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage()._cdata not in inputs:
                self.live.track(t)

    def _record(self, func, args, kwargs, out):
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense":
            self.syncs += 1
        free = name in FREE_ATEN or getattr(func, "is_view", False)
        if not free:
            self.launches.append(self._launch(func, name, args, kwargs, out))
        elif self.record_host_ops:
            self.launches.append(Launch("host", str(func), self.phase))
        self._track_outputs(args, kwargs, out)
        self.live.sample()

    def _launch(self, func, name, args, kwargs, out) -> Launch:
        schema_args = func._schema.arguments
        mutated, read = [], []
        gathered = GATHER_READS.get(name)
        picks = {}
        for i, arg in enumerate(schema_args):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            picks[arg.name] = value
            tensors = _tensors(value)
            if not tensors:
                continue
            if gathered and arg.name == gathered[0]:
                continue  # read only at the picked elements: added below
            writes = arg.alias_info is not None and arg.alias_info.is_write
            if writes:
                mutated.extend(tensors)
                if not (arg.kwarg_only or (i == 0 and name in WRITE_ONLY_FIRST)):
                    read.extend(tensors)  # an in-place update reads what it overwrites
            else:
                read.extend(tensors)
        # An in-place or out= op returns its mutated arguments: they are written once.
        mutated_storages = {t.untyped_storage()._cdata for t in mutated}
        outputs = [t for t in _tensors(out) if t.untyped_storage()._cdata not in mutated_storages]
        read = list({_view_key(t): t for t in read}.values())  # the same view passed twice is read once
        launch = Launch("aten", str(func), self.phase)
        launch.bytes_read = launch.distinct_bytes_read = sum(_footprint(t) for t in read)
        picked_bytes = 0
        if gathered:
            source, counter_arg = gathered
            source = picks.get(source)
            if isinstance(source, torch.Tensor) and counter_arg is not None:
                by = _tensors(out)[0] if counter_arg == "out" else picks.get(counter_arg)
                picked_bytes = by.numel() * source.element_size() if isinstance(by, torch.Tensor) else 0
            launch.bytes_read += picked_bytes
            launch.distinct_bytes_read += picked_bytes
        launch.bytes_written = launch.distinct_bytes_written = sum(_footprint(t) for t in mutated + outputs)
        # Which storages it read and wrote (storage key -> bytes), for a model that regroups aten launches into
        # fused kernels (benchmarks/calibrate.py); not part of the launch's JSON record.
        launch.storages_read = {t.untyped_storage()._cdata: _footprint(t) for t in read}
        if picked_bytes:
            launch.storages_read[picks[gathered[0]].untyped_storage()._cdata] = picked_bytes
        launch.storages_written = {t.untyped_storage()._cdata: _footprint(t) for t in mutated + outputs}
        packet = func.overloadpacket
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
            precision = _aten_matmul_precision(args)
            launch.dot_flops[precision] += flops
            launch.useful_dot_flops += flops
        result = _tensors(out) or mutated
        elements = sum(t.numel() for t in result)
        base = name.rstrip("_")
        if base in REDUCTIONS_ATEN:
            launch.lane_ops["reduce"] += sum(t.numel() for t in read)
        elif torch.Tag.pointwise in func.tags:
            launch.lane_ops["float"] += elements
        if base in TRANSCENDENTAL_ATEN:
            launch.transcendental_ops += elements if base not in REDUCTIONS_ATEN else sum(t.numel() for t in read)
        if torch.Tag.pointwise in func.tags or base in COPY_LIKE_ATEN:
            operands = read + mutated + outputs
            shape, order = (result[0].shape, _dim_order(result[0])) if result else (None, None)
            aligned = all(_dense(t) and (t.shape != shape or _dim_order(t) == order) for t in operands)
            launch.op_class = "pointwise" if aligned else "strided"
        # PyTorch's kernel re-reads a long row once per pass, but from L2 (Liger's published eager
        # cross-entropy times match one HBM pass): counted once; a model of generated code needs to know
        launch.long_rows = _long_softmax_rows(base, args)
        return launch


def _dense(t: torch.Tensor) -> bool:
    """Contiguous in some dimension order once its broadcast (stride-0) dimensions are dropped. TensorIterator
    vectorises an op whose operands are all dense and laid out in the output's order ("pointwise"); a
    slice, a gap or a transposed operand makes it index element by element ("strided")."""
    kept = [(size, stride) for size, stride in zip(t.shape, t.stride()) if stride != 0 and size != 1]
    expected = 1
    for size, stride in sorted(kept, key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _dim_order(t: torch.Tensor) -> tuple:
    """The dimensions from the outermost in memory to the innermost (size-1 dimensions left out)."""
    return tuple(sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=lambda d: -t.stride(d)))


def _long_softmax_rows(base: str, args) -> bool:
    """A softmax (forward or backward) whose rows do not fit the shared-memory cache of PyTorch's CUDA
    kernels (``SOFTMAX_SMEM_BYTES``): they take one pass per step over each row (forward: max, sum, write;
    backward: sum, write) — aten/src/ATen/native/cuda/SoftMax.cu."""
    if base not in SOFTMAX_OPS:
        return False
    x = args[0]
    dim = args[1] if len(args) > 1 and isinstance(args[1], int) else -1
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return False
    return x.shape[dim] * x.element_size() > SOFTMAX_SMEM_BYTES


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _aten_matmul_precision(args) -> str:
    """Precision a cuBLAS/cuDNN product of these inputs runs in under PyTorch's defaults (no TF32): the dtype
    of its first floating-point argument in argument order (attention's backward also takes int64 seeds)."""
    dtype = torch.float32
    for arg in args:
        found = [t for t in (arg if isinstance(arg, (list, tuple)) else [arg])
                 if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if found:
            dtype = found[0].dtype
            break
    return {torch.float32: "fp32_ieee", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64"}.get(dtype, str(dtype))