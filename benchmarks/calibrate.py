"""Check the ledger's performance model against published GPU measurements: rebuild every row of a CSV in
Liger-Kernel's benchmark format, count its work on the CPU, predict its time or peak memory on the row's GPU.

    python benchmarks/calibrate.py --measurements FILE.csv [--out DIR] [--rows N] [--fit]

writes ``DIR/calibration.json`` (one object per input row: the row's columns, ``predicted`` in the row's
unit (ms or MB), ``supported``, ``reason`` where not), ``DIR/summary.json`` and ``DIR/calibration.md``
(the summary as RESULTS.md quotes it) and prints a summary: per kernel × provider × mode ×
metric the median and worst |predicted / measured − 1|, the predicted and measured liger-over-huggingface
speedups, and the leave-one-kernel-out medians (the time model refitted without a kernel's rows, then
predicting them). Everything printed is **modelled** from CPU counts; the measurements are the CSV's.

How a row is rebuilt (``calibrate_workloads``): the benchmark call of Liger's script, on CPU tensors with
the rows dimension (M, B·T or the sequence) small; Liger's Triton kernels run through Triton's interpreter
under ``ledger_count.KernelCounter``, every aten op is counted by ``ledger_count.AtenCounter``. Each call is
counted at two small sizes of that dimension and every count extrapolated linearly to the measured size
(the workloads are linear in it; ``tests/test_calibrate.py`` checks it on a third size). As ``do_bench``
does, the call runs once before the counted call (so a gradient that is not reset accumulates), and the
tensors of ``grad_to_none`` lose their gradient before it.

* speed: ``ledger_model.CalibratedModel`` — the launches in issue order (views and allocations kept as
  ``host`` launches: host time only), a host that issues them and a GPU that runs them, after
  ``do_bench``'s L2 flush (see its docstring). Each Triton launch is compiled for the row's GPU
  architecture (``ledger_compile``: registers, spills, shared memory). ``--fit`` refits the global
  parameters on the file's speed rows (least absolute log error of each time and of each liger-over-
  huggingface speedup) and prints them; without it the documented fitted values are used.
* memory: the peak of the live bytes of every tensor of the script (inputs, parameters, gradients,
  saved activations, the call's temporaries), during the second call of ``full`` as ``_test_memory``
  measures it (``max_memory_allocated`` after ``reset_peak_memory_stats``), each allocation rounded to
  the caching allocator's 512 bytes, plus a cuBLAS workspace per thread that ran a matmul (the script's,
  the autograd engine's).
* torchcompile: the eager launches regrouped by a fusion model (``fuse``): every maximal run of
  non-matmul aten launches of one phase is one kernel that reads what it did not produce and writes
  what outlives it, except what AOTAutograd recomputes in the backward and the ``.grad`` accumulation,
  which runs outside the graph; its memory peak leaves out the tensors such a kernel keeps in registers.
"""
from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("benchmarks/calibrate.py must import triton itself (it sets TRITON_INTERPRET=1 first)")
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger_model as model  # noqa: E402

COLUMNS = ("kernel_name", "kernel_provider", "kernel_operation_mode", "metric_name", "metric_unit", "x_name",
           "x_label", "x_value", "y_value_50", "y_value_20", "y_value_80", "extra_benchmark_config_str",
           "gpu_name", "timestamp", "liger_version")
MODES = ("forward", "backward", "full")
ALLOCATOR_ROUND = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


# ------------------------------------------------------------------------------------------ input
def read_measurements(path: Path) -> list[dict]:
    """The CSV's rows, validated (columns, gpu_name, numbers) before anything is counted or written."""
    if not path.is_file():
        raise SystemExit(f"--measurements: no file {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"--measurements {path}: missing Liger benchmark columns {', '.join(missing)}")
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        try:
            model.gpu_for_name(row["gpu_name"])
        except ValueError as error:
            raise SystemExit(f"--measurements {path} line {number}: {error}") from None
        try:
            float(row["y_value_50"]), int(row["x_value"]), json.loads(row["extra_benchmark_config_str"])
        except (ValueError, json.JSONDecodeError) as error:
            raise SystemExit(f"--measurements {path} line {number}: unreadable value ({error})") from None
    return rows


def support(row: dict) -> str | None:
    """Why a row cannot be rebuilt (None: it can)."""
    import calibrate_workloads as W

    if row["kernel_name"] not in W.KERNELS:
        return f"kernel {row['kernel_name']!r} has no rebuilt workload (known: {', '.join(W.KERNELS)})"
    if row["kernel_provider"] not in W.PROVIDERS:
        return f"provider {row['kernel_provider']!r} unknown (known: {', '.join(W.PROVIDERS)})"
    if row["kernel_operation_mode"] not in MODES:
        return f"mode {row['kernel_operation_mode']!r} unknown"
    if row["metric_name"] not in ("speed", "memory"):
        return f"metric {row['metric_name']!r} unknown"
    if row["metric_name"] == "memory" and row["kernel_operation_mode"] != "full":
        return "memory is rebuilt for the full call only"
    return None


# ------------------------------------------------------------------------------------------ counting
def count_workload(row, scale: int, mode: str, liger: dict | None) -> dict:
    """One call of ``row``'s benchmark (scaled dimension = ``scale``) in ``mode`` (forward / backward / full,
    or ``memory``: the second of two full calls, no gradient reset), counted. Returns per provider flavour
    (``launches`` of ``liger`` or ``huggingface``, and ``torchcompile`` = the same fused) the launch list and
    the peak live bytes during the counted call."""
    import gc

    import torch

    import calibrate_workloads as W
    from ledger_count import KernelCounter

    torch.manual_seed(0)
    with KernelCounter() as kernels, _TraceCounter(kernels) as aten:
        kernels.launches = aten.launches  # one list, in issue order

        def phase(name):
            kernels.phase = aten.phase = name

        bench = W.build(row, scale, liger)
        state: dict = {}
        timed = "full" if mode == "memory" else mode
        bench.call(timed, phase, state)  # do_bench's (and _test_memory's first) call
        state.pop("output", None)  # not kept alive: the script drops it
        if mode != "memory":
            for tensor in bench.grad_to_none:
                tensor.grad = None
        gc.collect()
        start_launch, start_snapshot = len(aten.launches), len(aten.snapshots)
        aten.snapshot()
        preexisting = set(aten.snapshots[-1])
        result = bench.call(timed, phase, state)
        aten.snapshot()
        alive_after = set(aten.snapshots[-1])
        outputs = {t.untyped_storage()._cdata for t in _output_tensors(state.get("output"))}
        del result
        state.pop("output", None)
        launches = [launch for launch in aten.launches[start_launch:] if launch.phase != "setup"]
        snapshots = aten.snapshots[start_snapshot:]
        del bench, state
    out = {"liger" if row.provider == "liger" else "huggingface": _flavour(launches, snapshots, None)}
    if row.provider != "liger":
        groups = fuse(launches, alive_after, outputs, preexisting)
        out["torchcompile"] = _flavour(groups["launches"], snapshots, groups["internal"])
    return out


def _output_tensors(value) -> list:
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _output_tensors(item)]
    return [value] if hasattr(value, "untyped_storage") else []


def _flavour(launches, snapshots, internal) -> dict:
    internal = internal or set()
    peak = max(sum(_rounded(b) for key, b in snap.items() if key not in internal) for snap in snapshots)
    return {"launches": [_numbers(launch) for launch in launches], "peak_bytes": peak}


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATOR_ROUND) * ALLOCATOR_ROUND if nbytes else 0


def _numbers(launch) -> dict:
    if isinstance(launch, dict):
        return launch
    return {"kind": launch.kind, "name": launch.name, "phase": launch.phase, "bytes_read": launch.bytes_read,
            "bytes_written": launch.bytes_written, "dot_flops": dict(launch.dot_flops),
            "lane_ops": dict(launch.lane_ops), "transcendental_ops": launch.transcendental_ops,
            "grid": launch.grid, "load_calls": launch.load_calls, "load_sites": dict(launch.load_sites),
            "load_rounds": launch.load_rounds, "reduce_calls": launch.reduce_calls,
            "num_args": launch.num_args, "num_warps": launch.config.get("num_warps", 4),
            "compile_request": getattr(launch, "compile_request", None), "op_class": launch.op_class,
            "tensor_traffic": getattr(launch, "tensor_traffic", [])}


class _TraceCounter:
    """``AtenCounter`` with a snapshot of the live storages (key → bytes) after every aten op, and the host
    synchronisations (``.item()``) kept in the launch sequence."""

    def __new__(cls, kernels):
        import torch

        from ledger_count import AtenCounter, Launch

        _BF16_PRODUCTS = {torch.ops.aten.mm.default: torch.mm, torch.ops.aten.bmm.default: torch.bmm,
                          torch.ops.aten.addmm.default: torch.addmm}

        class TraceCounter(AtenCounter):
            def __init__(self, kernels):
                super().__init__(kernels, open_namespaces=(), record_host_ops=True)
                self.snapshots: list[dict] = []

            def snapshot(self):
                self.live.sample()
                self.snapshots.append({key: nbytes for key, (_, nbytes) in self.live._refs.items()})

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                # CPU bf16 matrix products run ~100x slower than fp32 ones (the MLPs' weight gradients take
                # minutes): compute them in fp32 and round, recording the op as issued (its counts depend on
                # shapes and dtypes only).
                if func in _BF16_PRODUCTS and not kwargs and all(
                        isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 and a.device.type == "cpu"
                        for a in args[:3 if func is torch.ops.aten.addmm.default else 2]):
                    out = _BF16_PRODUCTS[func](*[a.float() if isinstance(a, torch.Tensor) else a for a in args])
                    out = out.to(torch.bfloat16)
                    self._record(func, args, kwargs or {}, out)
                    return out
                return super().__torch_dispatch__(func, types, args, kwargs)

            def _record(self, func, args, kwargs, out):
                super()._record(func, args, kwargs, out)
                if func.__name__.split(".")[0] == "_local_scalar_dense":
                    self.launches.append(Launch("sync", "item", self.phase))
                self.snapshot()

        return TraceCounter(kernels)


# A launch of these stays its own kernel under torch.compile (a library call, a random draw, a host sync).
EXTERN = ("mm", "addmm", "bmm", "matmul", "linear", "normal_", "randn", "randn_like", "randint", "random_", "uniform_",
          "_local_scalar_dense")
# A forward intermediate that only the backward reads is recomputed there from the forward's inputs (AOTAutograd's
# min-cut partitioner saves inputs and small tensors, such as a norm's per-row statistics) unless it is smaller
# than this share of the largest tensor its kernel reads.
SAVED_SHARE = 1 / 16
# A softmax over rows too long for one pass (ledger_count._long_softmax_rows) is a looped reduction in
# inductor's kernel: one loop for the maximum, one for the sum of exponentials, each reading the row.
INDUCTOR_SOFTMAX_PASSES = 2


def fuse(launches, alive_after: set, outputs: set = frozenset(), preexisting: set = frozenset()) -> dict:
    """The fusion model of ``torchcompile``.

    * Each maximal run of aten launches of one phase that are not EXTERN becomes one kernel; it reads the
      storages it reads and did not write, and writes the storages it wrote that a later launch reads or
      that are alive after the call. Host-only launches (views, allocations) vanish into the graph.
    * A backward in-place update of a storage that existed before the call (``preexisting``: a leaf's
      ``.grad`` accumulated by the autograd engine's AccumulateGrad) runs outside the compiled graph.
    * A forward softmax over long rows reads them ``INDUCTOR_SOFTMAX_PASSES`` times.
    * A forward kernel does not write a large intermediate that only the backward would read (it is not one
      of the call's ``outputs``): the backward kernel that needs it recomputes it from the forward kernel's
      inputs, which it reads instead.

    ``internal``: storages a fused kernel produced and kept (never materialised, so left out of the memory
    peak)."""
    launches = [launch for launch in launches if launch.kind != "host"]
    fused, internal = [], set()
    read_later: list[set] = [set() for _ in launches]
    read_later_forward: list[set] = [set() for _ in launches]
    seen: set = set()
    seen_forward: set = set()
    for i in range(len(launches) - 1, -1, -1):
        read_later[i], read_later_forward[i] = set(seen), set(seen_forward)
        storages = set(getattr(launches[i], "storages_read", {}))
        seen |= storages
        if launches[i].phase == "forward":
            seen_forward |= storages

    def accumulates(launch):
        return launch.phase == "backward" and launch.name.split(".")[1].endswith("_") and any(
            key in preexisting for key in launch.storages_written)

    def extern(launch):
        return (launch.kind != "aten" or launch.name.split(".")[1] in EXTERN or sum(launch.dot_flops.values()) > 0
                or accumulates(launch))

    recomputed: dict = {}  # storage -> the inputs of the forward kernel that would have written it
    i = 0
    while i < len(launches):
        if extern(launches[i]):
            fused.append(launches[i])
            i += 1
            continue
        j = i
        while j < len(launches) and not extern(launches[j]) and launches[j].phase == launches[i].phase:
            j += 1
        group = launches[i:j]
        written: dict = {}
        read: dict = {}
        passes: dict = {}
        for launch in group:
            if launch.phase == "forward" and getattr(launch, "long_rows", False):
                for key in launch.storages_read:
                    passes[key] = INDUCTOR_SOFTMAX_PASSES
            for key, nbytes in launch.storages_read.items():
                if key in recomputed:
                    for source, source_bytes in recomputed[key].items():
                        if source not in written:
                            read[source] = max(read.get(source, 0), source_bytes)
                elif key not in written:
                    read[key] = max(read.get(key, 0), nbytes)
            for key, nbytes in launch.storages_written.items():
                written[key] = max(written.get(key, 0), nbytes)
        after = read_later[j - 1] | alive_after
        kept = {key: b for key, b in written.items() if key in after}
        if group[0].phase == "forward":
            largest = max(read.values(), default=0)
            for key, nbytes in list(kept.items()):
                needed_forward = key in read_later_forward[j - 1] or key in outputs
                if not needed_forward and nbytes >= SAVED_SHARE * largest:
                    recomputed[key] = dict(read)
                    del kept[key]
        internal |= set(written) - set(kept)
        lanes: dict = defaultdict(int)
        for launch in group:
            for kind, n in launch.lane_ops.items():
                lanes[kind] += n
        fused.append({"kind": "fused", "name": "+".join(l.name.split(".")[1] for l in group),
                      "phase": group[0].phase, "bytes_read": sum(b * passes.get(k, 1) for k, b in read.items()),
                      "bytes_written": sum(kept.values()),
                      "dot_flops": {}, "lane_ops": dict(lanes),
                      "transcendental_ops": sum(l.transcendental_ops for l in group), "grid": 1, "load_calls": 0})
        i = j
    return {"launches": fused, "internal": internal}


def extrapolate(a: dict, b: dict, s1: int, s2: int, target: int) -> dict:
    """A flavour's counts at ``target`` from its counts at ``s1`` and ``s2`` (linear in the scaled size)."""
    t = (target - s1) / (s2 - s1)

    def lin(x, y):
        return x + (y - x) * t

    la, lb = a["launches"], b["launches"]
    if [l["name"] for l in la] != [l["name"] for l in lb]:
        raise ValueError("the launch sequence changes with the scaled size: not extrapolable")
    launches = []
    for x, y in zip(la, lb):
        out = dict(x)
        for key in ("bytes_read", "bytes_written", "transcendental_ops", "grid", "load_calls", "reduce_calls"):
            out[key] = max(0.0, lin(x.get(key, 0), y.get(key, 0)))
        for key in ("dot_flops", "lane_ops", "load_sites"):
            xs, ys = x.get(key, {}), y.get(key, {})
            out[key] = {k: max(0.0, lin(xs.get(k, 0), ys.get(k, 0))) for k in set(xs) | set(ys)}
        # per site, then the busiest: the site that dominates can change with the size (a weight loaded once
        # per program against a row loaded once per row)
        out["load_rounds"] = max(out["load_sites"].values(), default=0.0)
        tx, ty = x.get("tensor_traffic", []), y.get("tensor_traffic", [])
        if len(tx) != len(ty):
            raise ValueError(f"{x['name']}: its tensor arguments change with the scaled size: not extrapolable")
        out["tensor_traffic"] = [[max(0.0, lin(a, b)) for a, b in zip(ta, tb)] for ta, tb in zip(tx, ty)]
        out["compile_request"] = y.get("compile_request")  # the larger sample's constexprs (loop trip counts)
        launches.append(out)
    return {"launches": launches, "peak_bytes": lin(a["peak_bytes"], b["peak_bytes"])}


# ------------------------------------------------------------------------------------------ driver
def rebuild(rows: list[dict], log=print) -> list[dict]:
    """For every row, its extrapolated counts (``counts``) or the reason it is unsupported."""
    import calibrate_workloads as W

    results = [{"row": row} for row in rows]
    cache: dict = {}
    liger_modules: dict = {}
    for result in results:
        row = result["row"]
        reason = support(row)
        if reason:
            result["reason"] = reason
            continue
        gpu = model.gpu_for_name(row["gpu_name"])
        spec = W.Row(row["kernel_name"], row["kernel_provider"], row["x_name"], int(row["x_value"]),
                     json.loads(row["extra_benchmark_config_str"]))
        mode = "memory" if row["metric_name"] == "memory" else row["kernel_operation_mode"]
        key = (spec.workload_key(), mode, gpu.sms, row["liger_version"])
        if key not in cache:
            liger = None
            if spec.provider == "liger":
                version_key = (row["liger_version"], gpu.sms)
                if version_key not in liger_modules:
                    try:
                        liger_modules[version_key] = W.load_liger(row["liger_version"], gpu.sms)
                    except W.LigerMissing as error:
                        liger_modules[version_key] = error
                liger = liger_modules[version_key]
            if isinstance(liger, Exception):
                cache[key] = liger
            else:
                start = time.perf_counter()
                s1, s2 = W.SMALL_SCALES
                try:
                    cache[key] = (count_workload(spec, s1, mode, liger), count_workload(spec, s2, mode, liger))
                except Exception as error:  # a row the rebuild cannot run is reported, not hidden
                    cache[key] = RuntimeError(f"{type(error).__name__}: {error}")
                log(f"[calibrate] counted {spec.kernel} {spec.provider} {mode} x={spec.x_value} "
                    f"({time.perf_counter() - start:.1f} s)")
        counted = cache[key]
        if isinstance(counted, Exception):
            result["reason"] = str(counted)
            continue
        flavour = row["kernel_provider"]
        s1, s2 = W.SMALL_SCALES
        result["counts"] = extrapolate(counted[0][flavour], counted[1][flavour], s1, s2, spec.full_scale())
        result["gpu"] = gpu
        result["uses_matmul"] = spec.kernel in ("swiglu", "geglu", "rope")
    attach_resource_usage(results, log)
    return results


def attach_resource_usage(results: list[dict], log=print) -> None:
    """Compile every Triton launch for its row's GPU (``ledger_compile``) and record its registers, spills,
    shared memory and pipelining on the launch (absent where it failed)."""
    import ledger_compile

    by_arch: dict = defaultdict(list)
    for result in results:
        if "counts" in result:
            by_arch[result["gpu"].compute_capability].extend(result["counts"]["launches"])
    for arch, launches in by_arch.items():
        done = ledger_compile.attach_usage(launches, arch)
        log(f"[calibrate] compiled {done['configurations']} Triton launch configurations for sm_{arch} "
            f"({done['seconds']:.1f} s)" + (f"; failed: {'; '.join(done['failed'])}" if done["failed"] else ""))


def save_counts(path: Path, results: list[dict]) -> None:
    """The extrapolated counts of every rebuilt row (or its reason), for ``--from-counts``."""
    records = [{"row": r["row"], **({"counts": r["counts"], "uses_matmul": r["uses_matmul"]} if "counts" in r
                                    else {"reason": r["reason"]})} for r in results]
    path.write_text(json.dumps(records) + "\n", encoding="utf-8")


def load_counts(path: Path, rows: list[dict]) -> list[dict]:
    records = json.loads(path.read_text(encoding="utf-8"))
    if [r["row"] for r in records] != rows:
        raise SystemExit(f"--from-counts {path}: its rows are not those of --measurements (rerun without it)")
    for record in records:
        if "counts" in record:
            record["gpu"] = model.gpu_for_name(record["row"]["gpu_name"])
    return records


def predict(result: dict, params: dict) -> float:
    row, counts, gpu = result["row"], result["counts"], result["gpu"]
    if row["metric_name"] == "memory":
        # cuBLAS handles (and their workspaces) are per thread: the script's thread when it ran a matmul, and
        # the autograd engine's device thread when the backward runs matmuls.
        backward_matmul = any(l["phase"] == "backward" and any(l["dot_flops"].values()) for l in counts["launches"])
        workspace = model.cublas_workspace_bytes(gpu) * (int(result["uses_matmul"]) + int(backward_matmul))
        return (counts["peak_bytes"] + workspace) / 2**20
    return model.CalibratedModel(params).call_ms(counts["launches"], gpu, row["kernel_provider"])


# ------------------------------------------------------------------------------------------ summary
def error(result: dict) -> float:
    return result["predicted"] / float(result["row"]["y_value_50"]) - 1


def _median_abs(values) -> float:
    return statistics.median(abs(v) for v in values) if values else float("nan")


def _percentile_abs(values, q: float) -> float:
    ordered = sorted(abs(v) for v in values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[index]


def _pair_key(row: dict) -> tuple:
    return (row["kernel_name"], row["extra_benchmark_config_str"], row["kernel_operation_mode"], row["x_value"],
            row["kernel_provider"])


def speedups(results: list[dict]) -> list[dict]:
    """Predicted and measured time of huggingface over liger, per (kernel, config, mode, x)."""
    by_key = {}
    for r in results:
        row = r["row"]
        if row["metric_name"] == "speed" and "predicted" in r:
            by_key[_pair_key(row)] = r
    out = []
    for (kernel, config, mode, x, provider), r in by_key.items():
        if provider != "liger" or (kernel, config, mode, x, "huggingface") not in by_key:
            continue
        hf = by_key[(kernel, config, mode, x, "huggingface")]
        measured = float(hf["row"]["y_value_50"]) / float(r["row"]["y_value_50"])
        predicted = hf["predicted"] / r["predicted"]
        out.append({"kernel": kernel, "mode": mode, "x": x, "measured": measured, "predicted": predicted,
                    "error": predicted / measured - 1})
    return out


def summary(results: list[dict], loko: dict | None) -> dict:
    supported = [r for r in results if "predicted" in r]
    speed = [error(r) for r in supported if r["row"]["metric_name"] == "speed"]
    memory = [error(r) for r in supported if r["row"]["metric_name"] == "memory"]
    groups = defaultdict(list)
    for r in supported:
        row = r["row"]
        groups[(row["kernel_name"], row["kernel_provider"], row["kernel_operation_mode"], row["metric_name"])].append(error(r))
    ups = speedups(results)
    return {
        "rows": len(results), "supported": len(supported),
        "speed": {"rows": len(speed), "median_abs_error": _median_abs(speed), "p90_abs_error": _percentile_abs(speed, 0.9)},
        "memory": {"rows": len(memory), "median_abs_error": _median_abs(memory),
                   "p90_abs_error": _percentile_abs(memory, 0.9)},
        "speedup_liger_over_huggingface": {"pairs": len(ups), "median_abs_error": _median_abs([u["error"] for u in ups]),
                                           "pairs_detail": ups},
        "groups": [{"kernel": k[0], "provider": k[1], "mode": k[2], "metric": k[3], "rows": len(v),
                    "median_abs_error": _median_abs(v), "worst_abs_error": max(abs(e) for e in v)}
                   for k, v in sorted(groups.items())],
        "leave_one_kernel_out": loko,
    }


def summary_text(s: dict, params: dict) -> str:
    lines = [f"calibration (modelled from CPU counts vs the file's measurements): {s['supported']}/{s['rows']} rows "
             f"rebuilt ({100 * s['supported'] / max(1, s['rows']):.1f} %)",
             f"  speed rows {s['speed']['rows']}: median |pred/meas-1| {100 * s['speed']['median_abs_error']:.1f} %, "
             f"90th pct {100 * s['speed']['p90_abs_error']:.1f} %",
             f"  memory rows {s['memory']['rows']}: median {100 * s['memory']['median_abs_error']:.2f} %, "
             f"90th pct {100 * s['memory']['p90_abs_error']:.2f} %",
             f"  liger-over-huggingface speedup ({s['speedup_liger_over_huggingface']['pairs']} pairs): median error "
             f"{100 * s['speedup_liger_over_huggingface']['median_abs_error']:.1f} %", "",
             f"{'kernel':14} {'provider':12} {'mode':9} {'metric':7} {'rows':>4} {'median':>8} {'worst':>8}"]
    for g in s["groups"]:
        lines.append(f"{g['kernel']:14} {g['provider']:12} {g['mode']:9} {g['metric']:7} {g['rows']:>4} "
                     f"{100 * g['median_abs_error']:>7.1f}% {100 * g['worst_abs_error']:>7.1f}%")
    lines.append("")
    lines.append(f"{'speedup liger/hf':22} {'x':>7} {'measured':>9} {'predicted':>9}")
    for u in s["speedup_liger_over_huggingface"]["pairs_detail"]:
        lines.append(f"{u['kernel'] + ' ' + u['mode']:22} {u['x']:>7} {u['measured']:>8.2f}x {u['predicted']:>8.2f}x")
    if s["leave_one_kernel_out"]:
        lines.append("")
        lines.append("leave-one-kernel-out (time model refitted without the kernel, speed rows of that kernel):")
        for kernel, v in s["leave_one_kernel_out"].items():
            lines.append(f"  {kernel:14} median |pred/meas-1| {100 * v['median_abs_error']:.1f} % "
                         f"(in-sample {100 * v['in_sample_median_abs_error']:.1f} %)")
    lines.append("")
    lines.append("time-model parameters: " + ", ".join(f"{k}={v:.4g}" for k, v in params.items()))
    return "\n".join(lines)


def summary_markdown(s: dict, params: dict) -> str:
    """The summary as the Markdown RESULTS.md quotes (``DIR/calibration.md``): targets, the per-group table, the
    leave-one-kernel-out medians and the parameters."""
    def pct(value, digits=1):
        return f"{100 * value:.{digits}f} %"

    speed, memory, ups = s["speed"], s["memory"], s["speedup_liger_over_huggingface"]
    lines = [f"- rows rebuilt: **{s['supported']} / {s['rows']}** ({100 * s['supported'] / max(1, s['rows']):.0f} %)",
             f"- speed rows ({speed['rows']}): median |predicted / measured − 1| "
             f"**{pct(speed['median_abs_error'])}**, 90th percentile **{pct(speed['p90_abs_error'])}** "
             "(targets 15 % / 40 %)",
             f"- liger-over-huggingface speedup ({ups['pairs']} pairs): median error "
             f"**{pct(ups['median_abs_error'])}** (target 15 %)",
             f"- memory rows ({memory['rows']}): median **{pct(memory['median_abs_error'], 2)}**, 90th percentile "
             f"{pct(memory['p90_abs_error'])} (target 5 % median)"]
    if s["leave_one_kernel_out"]:
        loko = s["leave_one_kernel_out"]
        lines.append("- leave-one-kernel-out (refitted from the same start on the other five kernels' speed rows, "
                     "predicting the sixth; target ≤ 25 %): " + ", ".join(
                         f"{k} {pct(v['median_abs_error'])}" for k, v in loko.items()))
    lines.append("- parameters: " + ", ".join(f"{k} = {v:.4g}" for k, v in params.items()))
    lines += ["", "| kernel | provider | mode | metric | rows | median error | worst error |",
              "|---|---|---|---|---|---|---|"]
    for g in s["groups"]:
        lines.append(f"| {g['kernel']} | {g['provider']} | {g['mode']} | {g['metric']} | {g['rows']} | "
                     f"{pct(g['median_abs_error'])} | {pct(g['worst_abs_error'])} |")
    return "\n".join(lines) + "\n"


def fit_and_score(results: list[dict], fit: bool, log=print, fixed: dict | None = None) -> tuple[dict, dict | None]:
    """The parameters (refitted on the speed rows with ``fit``) and, with ``fit``, leave-one-kernel-out.
    ``fixed``: parameters held at the given values in every fit (a sensitivity check)."""
    fixed = dict(fixed or {})
    start = {**model.START_PARAMS, **fixed}
    speed = [r for r in results if "counts" in r and r["row"]["metric_name"] == "speed"]
    params = dict(model.CALIBRATED_PARAMS)
    if not fit or not speed:
        return params, None

    def cases(rs):
        return [(r["counts"]["launches"], r["gpu"], r["row"]["kernel_provider"], float(r["row"]["y_value_50"]))
                for r in rs]

    def pairs(rs):
        index = {_pair_key(r["row"]): i for i, r in enumerate(rs)}
        return [(index[key], index[key[:-1] + ("huggingface",)]) for key in index
                if key[-1] == "liger" and key[:-1] + ("huggingface",) in index]

    params = model.fit_params(cases(speed), dict(start), pairs=pairs(speed), fixed=frozenset(fixed))
    loko = {}
    for kernel in sorted({r["row"]["kernel_name"] for r in speed}):
        train = [r for r in speed if r["row"]["kernel_name"] != kernel]
        test = [r for r in speed if r["row"]["kernel_name"] == kernel]
        held = model.fit_params(cases(train), dict(start), pairs=pairs(train), fixed=frozenset(fixed))
        errs = [model.CalibratedModel(held).call_ms(r["counts"]["launches"], r["gpu"], r["row"]["kernel_provider"])
                / float(r["row"]["y_value_50"]) - 1 for r in test]
        ins = [model.CalibratedModel(params).call_ms(r["counts"]["launches"], r["gpu"], r["row"]["kernel_provider"])
               / float(r["row"]["y_value_50"]) - 1 for r in test]
        loko[kernel] = {"rows": len(test), "median_abs_error": _median_abs(errs),
                        "in_sample_median_abs_error": _median_abs(ins), "params": held}
        log(f"[calibrate] leave-one-kernel-out {kernel}: {100 * _median_abs(errs):.1f} %")
    return params, loko


def ledger_markdown(ledger: dict, params: dict, s: dict) -> str:
    """The performance ledger's rows (a ``benchmarks/ledger.py`` ledger.json) re-priced by the calibrated
    model: fused vs eager per op × case × dtype × mode on H100 SXM and H200 SXM, with the calibration's
    measured error band beside them."""
    calibrated = model.CalibratedModel(params)
    rows = {}
    for row in ledger["rows"]:
        if "timeline" not in row:
            raise SystemExit("--ledger: its rows have no launch timeline (a ledger.json older than the calibrated "
                             "model): rerun benchmarks/ledger.py")
        provider = "liger" if row["provider"] == "fused" else "huggingface"
        times = {key: calibrated.call_ms(row["timeline"], model.GPUS[key], provider) for key in ("h100_sxm", "h200_sxm")}
        rows[(row["op"], row["case"], row["dtype"], row["mode"], row["provider"])] = (row, times)
    band_speed = 100 * s["speed"]["median_abs_error"]
    band_p90 = 100 * s["speed"]["p90_abs_error"]
    band_up = 100 * s["speedup_liger_over_huggingface"]["median_abs_error"]
    lines = [f"Modelled, not measured. Model error on the published H100 NVL rows: time median ±{band_speed:.0f} % "
             f"(90th percentile ±{band_p90:.0f} %), fused-over-eager speedup median ±{band_up:.0f} %.", "",
             "| op | case | dtype | mode | H100 SXM ms fused / eager | × eager H100 SXM | H200 SXM ms fused / eager "
             "| × eager H200 SXM | × eager H100, uncalibrated roofline | moved by |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, case, dtype, mode, provider), (row, times) in rows.items():
        if provider != "fused" or (op, case, dtype, mode, "eager") not in rows:
            continue
        if mode != "forward+backward" and (op, case, dtype, "forward+backward", provider) in rows:
            continue  # the table quotes the whole op; the ledger.json rows have each phase too
        eager_row, eager = rows[(op, case, dtype, mode, "eager")]
        up = {k: eager[k] / times[k] for k in times}
        old = eager_row["predicted_ms"]["h100"] / row["predicted_ms"]["h100"]
        lines.append(f"| {op} | {case} | {dtype} | {mode} | {times['h100_sxm']:.3g} / {eager['h100_sxm']:.3g} | "
                     f"{up['h100_sxm']:.2f} | {times['h200_sxm']:.3g} / {eager['h200_sxm']:.3g} | {up['h200_sxm']:.2f} | "
                     f"{old:.2f} | {100 * (up['h100_sxm'] / old - 1):+.0f} % |")
    lines.extend(step_markdown(ledger, params, s))
    return "\n".join(lines) + "\n"


def step_markdown(ledger: dict, params: dict, s: dict) -> list[str]:
    """The training step's modelled time, fused vs reference ops (``ledger_step.step_time``), per dtype and GPU,
    with its modelled peak memory; [] when the ledger has no step timelines."""
    import ledger_step

    step = ledger.get("step") or {}
    variants = {(v["dtype"], v["title"]): v for v in step.get("variants", []) if "timeline" in v}
    if not variants:
        return []
    band = 100 * s["speed"]["median_abs_error"]
    lines = ["", f"**Training step** ({step['title']}), modelled, not measured (time: calibrated model, error "
                 f"±{band:.0f} % median on the published rows; peak: live tensor bytes on fake tensors):", "",
             "| dtype | H100 SXM ms fused / reference | × reference H100 | H200 SXM ms fused / reference "
             "| × reference H200 | our ops' GPU ms in the fused step (H100) | peak MB fused / reference |",
             "|---|---|---|---|---|---|---|"]
    priced = []
    for dtype in ("fp32", "bf16"):
        fused, reference = variants.get((dtype, "fused ops")), variants.get((dtype, "reference ops"))
        if not fused or not reference:
            continue
        times = {}
        for key in ("h100_sxm", "h200_sxm"):
            gpu = model.GPUS[key]
            times[key] = (ledger_step.step_time(fused, ledger["rows"], gpu, params),
                          ledger_step.step_time(reference, ledger["rows"], gpu, params))
        f100, r100 = times["h100_sxm"]
        f200, r200 = times["h200_sxm"]
        share = 100 * f100["fused_ops_gpu_ms"] / f100["ms"]
        lines.append(f"| {dtype} | {f100['ms']:.1f} / {r100['ms']:.1f} | {r100['ms'] / f100['ms']:.2f} | "
                     f"{f200['ms']:.1f} / {r200['ms']:.1f} | {r200['ms'] / f200['ms']:.2f} | "
                     f"{f100['fused_ops_gpu_ms']:.2f} ({share:.1f} % of the step) | "
                     f"{fused['peak_bytes'] / 2**20:,.0f} / {reference['peak_bytes'] / 2**20:,.0f} |")
        priced = f100["priced"]
    if priced:
        lines += ["", "How the fused step's custom ops were priced: " + "; ".join(priced) + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measurements", required=True, help="a CSV in Liger-Kernel's benchmark format")
    parser.add_argument("--out", default="runs/calibration", help="folder for calibration.json")
    parser.add_argument("--rows", type=int, default=0, help="only the first N rows (a quick check)")
    parser.add_argument("--fit", action="store_true",
                        help="refit the time model's global parameters on the speed rows, with leave-one-kernel-out")
    parser.add_argument("--from-counts", metavar="COUNTS_JSON",
                        help="reuse the counts of an earlier run (its DIR/counts.json, same --measurements): "
                             "refit and re-predict without counting")
    parser.add_argument("--fix", action="append", default=[], metavar="PARAM=VALUE",
                        help="with --fit: hold a parameter of START_PARAMS at VALUE in every fit (repeatable), "
                             "to see what the rows leave undetermined")
    parser.add_argument("--ledger", metavar="LEDGER_JSON",
                        help="also re-price a benchmarks/ledger.py run's rows with the calibrated model "
                             "(DIR/ledger_calibrated.md)")
    args = parser.parse_args(argv)
    if args.ledger and not Path(args.ledger).is_file():
        raise SystemExit(f"--ledger: no file {args.ledger}")
    fixed = {}
    for text in args.fix:
        name, _, value = text.partition("=")
        if name not in model.START_PARAMS:
            raise SystemExit(f"--fix {text}: unknown parameter {name!r} (one of {', '.join(model.START_PARAMS)})")
        try:
            fixed[name] = float(value)
        except ValueError:
            raise SystemExit(f"--fix {text}: VALUE must be a number") from None
    if fixed and not args.fit:
        raise SystemExit("--fix holds a parameter during the fit: add --fit")
    rows = read_measurements(Path(args.measurements))
    if args.rows:
        rows = rows[: args.rows]
    if args.from_counts:
        results = load_counts(Path(args.from_counts), rows)
    else:
        results = rebuild(rows)
    params, loko = fit_and_score(results, args.fit, fixed=fixed)
    for r in results:
        if "counts" in r:
            r["predicted"] = predict(r, params)
    s = summary(results, loko)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for r in results:
        record = dict(r["row"])
        record["supported"] = "predicted" in r
        if "predicted" in r:
            record["predicted"] = r["predicted"]
        else:
            record["reason"] = r["reason"]
        records.append(record)
    save_counts(out / "counts.json", results)
    (out / "calibration.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"summary": s, "params": params}, indent=1) + "\n", encoding="utf-8")
    (out / "calibration.md").write_text(summary_markdown(s, params), encoding="utf-8")
    print(summary_text(s, params))
    if args.ledger:
        table = ledger_markdown(json.loads(Path(args.ledger).read_text(encoding="utf-8")), params, s)
        (out / "ledger_calibrated.md").write_text(table, encoding="utf-8")
        print(table)
    print(f"[calibrate] wrote {out / 'calibration.json'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
