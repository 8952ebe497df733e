"""The counting driver of the performance ledger (``benchmarks/ledger.py`` is the entry point).

Imported only by ``ledger.py`` after it has set ``TRITON_INTERPRET=1``: this module imports torch, triton
(through the package) and the workloads. See ``ledger.py`` for what the ledger counts and how.
"""
from __future__ import annotations

import datetime
import gc
import inspect
import os
import platform
import time
from collections import Counter, defaultdict

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import incrementer_fast as inc
from incrementer_fast.testing import speed_up_interpreter
import ledger_compile
import ledger_model as model
import ledger_scale as scale
import workloads as W
from ledger_count import AtenCounter, KernelCounter

# Helper calls inside a launch skip the interpreter's redundant re-patching of triton.language: it is host
# time of the interpreter only (a third of --size tiny here), not work a kernel issues, so the counts are
# the same.
speed_up_interpreter()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("fused", "eager")
MODE_PHASES = {"forward": ("forward",), "backward": ("backward",), "forward+backward": ("forward", "backward")}
SCHEMA_VERSION = 1
CALIBRATED_GPUS = ("h100_sxm", "h200_sxm")


# --------------------------------------------------------------------------------------- cases
def parse_case(text: str) -> W.Case:
    """``op:K1=v1,K2=v2`` → a Case of size ``custom`` with those dims (in the order given)."""
    op, _, dims_text = text.partition(":")
    if op not in W.OPS:
        raise SystemExit(f"--case: unknown op {op!r} (one of {', '.join(W.OPS)})")
    dims = []
    for item in filter(None, dims_text.split(",")):
        name, _, value = item.partition("=")
        dims.append((name.strip(), int(value)))
    return W.Case(op, "custom", ", ".join(f"{k}={v}" for k, v in dims), tuple(dims))


def input_names(op: str) -> list[str]:
    """The names of an op's inputs, from its workload call ``call(ns, *args)``."""
    return list(inspect.signature(W.OPS[op].call).parameters)[1:]


def make_inputs(case: W.Case, provider: str, dtype: torch.dtype) -> W.Inputs:
    """Real CPU tensors for the interpreter; for eager, call inside ``FakeTensorMode`` (shapes, no data)."""
    if provider == "fused":
        return W.make_inputs(case, "cpu", dtype, seed=0)
    return W.OPS[case.op].make(case.d, torch.device("cpu"), dtype, None)


def provider_mode(provider: str):
    """fused: the Triton kernels, never a silent fallback to the reference (``use_backend("triton")``
    raises where they cannot run). eager: fake CPU tensors — every op and its shapes as on real ones, no
    data, so paper shapes cost nothing."""
    return inc.use_backend("triton") if provider == "fused" else FakeTensorMode()


# ------------------------------------------------------------------------------------ counting
def count_case(case: W.Case, dtype: torch.dtype, provider: str, sample_programs: int = 0) -> dict:
    """Run one op case once (forward, then backward where the op has one) under the counters
    (``sample_programs``: see ``KernelCounter``)."""
    spec = W.OPS[case.op]
    namespace = inc if provider == "fused" else inc.reference
    with provider_mode(provider):
        inputs = make_inputs(case, provider, dtype)
        has_backward = "backward" in spec.modes and bool(inputs.differentiable)
        gc.collect()
        start = time.perf_counter()  # the counted run only (not the drawing of its inputs)
        try:
            counted = _count(spec, namespace, inputs, has_backward, sample_programs=sample_programs)
        finally:
            if sample_programs:
                # The programs left out never incremented a "last program done" counter (cds_dice_loss's
                # forward): zero it for the launches that follow.
                from incrementer_fast.kernels.utils import reset_completion_counters

                reset_completion_counters()
        counted["wall_s"] = time.perf_counter() - start
    counted["shapes"] = {name: list(t.shape) for name, t in zip(input_names(case.op), inputs.args)
                         if isinstance(t, torch.Tensor)}
    return counted


def launch_plan(case: W.Case, dtype: torch.dtype) -> dict:
    """The fused op's launch plan at ``case``'s shape, on fake tensors with no kernel executed: every launch
    with its tiles and grid, the launchers' torch ops with their bytes, the peak live bytes (exact; the
    Triton launches' own counts are zero). Cheap at any size (see ledger_scale)."""
    spec = W.OPS[case.op]
    with FakeTensorMode(), inc.use_backend("triton"):
        inputs = W.OPS[case.op].make(case.d, torch.device("cpu"), dtype, None)
        has_backward = "backward" in spec.modes and bool(inputs.differentiable)
        return _count(spec, inc, inputs, has_backward, dry=True)


def _count(spec, namespace, inputs: W.Inputs, has_backward: bool, dry: bool = False,
           sample_programs: int = 0) -> dict:
    with KernelCounter(dry=dry, sample_programs=sample_programs) as kernels, \
            AtenCounter(kernels, open_fake=dry, record_host_ops=True) as aten:
        output = spec.call(namespace, *inputs.args)
        forward_peak = aten.live.peak
        peaks = {"forward": forward_peak}
        if has_backward:
            kernels.phase = aten.phase = "backward"
            base = aten.live.reset_peak()
            grads = torch.autograd.grad(output, inputs.differentiable, inputs.grad_output)
            peaks["backward"] = aten.live.peak - base
            peaks["forward+backward"] = max(forward_peak, aten.live.peak)
            del grads
        del output
    launches = sorted(kernels.launches + aten.launches, key=lambda launch: launch.phase != "forward")
    # (host launches — views, allocations — are priced by the calibrated model's host timeline only)
    return {"launches": [launch.to_json() for launch in launches], "peaks": peaks,
            "interpreter_s": sum(launch.interpreter_s for launch in kernels.launches),
            "syncs": aten.syncs, "custom_ops": dict(aten.custom_ops)}


def case_shapes(case: W.Case, dtype: torch.dtype) -> dict:
    """Input name → shape of a case, from fake tensors (no memory, whatever the size)."""
    with FakeTensorMode():
        inputs = W.OPS[case.op].make(case.d, torch.device("cpu"), dtype, None)
    return {name: list(t.shape) for name, t in zip(input_names(case.op), inputs.args) if isinstance(t, torch.Tensor)}


def count_fused_scaled(case: W.Case, dtype: torch.dtype, log) -> dict:
    """The fused counts of ``case`` extrapolated from small samples (``ledger_scale``), or counted directly
    when no sampling reproduces its launch plan."""
    target_plan = launch_plan(case, dtype)
    if case.op in W.PROGRAM_SAMPLED_OPS:
        log(f"  {case.shape_text}: counting {W.PROGRAM_SAMPLE} programs of each launch (an estimate)")
        return count_case(case, dtype, "fused", sample_programs=W.PROGRAM_SAMPLE)
    choice = scale.choose_axes(case, target_plan, lambda sample: launch_plan(sample, dtype))
    if choice is None:
        log(f"  no sampling reproduces the launch plan of {case.shape_text}: counting it directly")
        return count_case(case, dtype, "fused")
    samples, runs = [], []
    for corner in scale.corners(choice):
        sample = scale.sample_case(case, choice.axes, corner)
        counted = count_case(sample, dtype, "fused")
        log(f"  sample {sample.shape_text}: {counted['wall_s']:.1f} s")
        samples.append(counted)
        runs.append((sample, counted["wall_s"]))
    counted = scale.extrapolate(choice, samples, target_plan)
    counted["shapes"] = case_shapes(case, dtype)
    counted["sample_runs"] = runs
    return counted


def plain_interpreter_seconds(case: W.Case, dtype: torch.dtype) -> float:
    """Wall time of the same fused forward + backward without any instrumentation (the harness's baseline)."""
    spec = W.OPS[case.op]
    inputs = make_inputs(case, "fused", dtype)
    with provider_mode("fused"):
        gc.collect()
        start = time.perf_counter()
        output = spec.call(inc, *inputs.args)
        if "backward" in spec.modes and inputs.differentiable:
            torch.autograd.grad(output, inputs.differentiable, inputs.grad_output)
    return time.perf_counter() - start


def totals(launches: list[dict]) -> dict:
    """Sums over launches of the counted quantities."""
    dot = Counter()
    lanes = Counter()
    out = {"bytes_read": 0, "bytes_written": 0, "distinct_bytes_read": 0, "distinct_bytes_written": 0,
           "useful_flops": 0, "transcendental_ops": 0, "atomic_lanes": 0, "atomic_max_per_address": 0}
    for launch in launches:
        for key in ("bytes_read", "bytes_written", "distinct_bytes_read", "distinct_bytes_written"):
            out[key] += launch[key]
        out["useful_flops"] += launch["useful_dot_flops"]
        out["transcendental_ops"] += launch["transcendental_ops"]
        out["atomic_lanes"] += launch["atomic_lanes"]
        out["atomic_max_per_address"] = max(out["atomic_max_per_address"], launch["atomic_max_per_address"])
        dot.update(launch["dot_flops"])
        lanes.update(launch["lane_ops"])
    out["flops"] = sum(dot.values())
    out["dot_flops_by_precision"] = dict(dot)
    out["lane_ops_by_kind"] = dict(lanes)
    out["lane_ops"] = sum(lanes.values())
    return out


def kernel_breakdown(launches: list[dict]) -> list[dict]:
    """Per kernel (or aten op) name: launches, grids, configs, bytes, FLOPs and modelled H200 time."""
    groups = defaultdict(list)
    for launch in launches:
        groups[(launch["kind"], launch["name"])].append(launch)
    rows = []
    for (kind, name), group in groups.items():
        t = totals(group)
        configs = []
        for launch in group:
            if launch["config"] and launch["config"] not in configs:
                configs.append(launch["config"])
        shapes = Counter()
        for launch in group:
            shapes.update(launch["dot_shapes"])
        rows.append({
            "kind": kind, "name": name, "launches": len(group), "grids": sorted({launch["grid"] for launch in group}),
            "configs": configs, "bytes_read": t["bytes_read"], "bytes_written": t["bytes_written"],
            "distinct_bytes": t["distinct_bytes_read"] + t["distinct_bytes_written"],
            "flops": t["flops"], "useful_flops": t["useful_flops"], "dot_flops_by_precision": t["dot_flops_by_precision"],
            "dot_shapes": dict(shapes), "lane_ops": t["lane_ops"], "lane_ops_by_kind": t["lane_ops_by_kind"],
            "transcendental_ops": t["transcendental_ops"], "atomic_lanes": t["atomic_lanes"],
            "atomic_max_per_address": t["atomic_max_per_address"],
            "uncounted": dict(sum((Counter(launch["uncounted"]) for launch in group), Counter())),
            "predicted_ms": {name_: model.predict(group, device)["ms"] for name_, device in model.DEVICES.items()},
        })
    return rows


def rows_for(case: W.Case, dtype_name: str, provider: str, counted: dict) -> list[dict]:
    spec = W.OPS[case.op]
    dtype = DTYPES[dtype_name]
    modes = [m for m in spec.modes if m in counted["peaks"]]  # no backward rows for an op without gradients
    rows = []
    for mode in modes:
        timeline = [launch for launch in counted["launches"] if launch["phase"] in MODE_PHASES[mode]]
        launches = [launch for launch in timeline if launch["kind"] != "host"]  # the GPU's launches
        t = totals(launches)
        predictions = {name: model.predict(launches, device) for name, device in model.DEVICES.items()}
        cached = {name: model.predict(launches, device, perfect_cache=True) for name, device in model.DEVICES.items()}
        triton = [launch for launch in launches if launch["kind"] == "triton"]
        rows.append({
            "op": case.op, "case": case.title, "case_key": case.key, "dtype": dtype_name, "mode": mode,
            "provider": provider, "shapes": counted["shapes"],
            "bytes_read": t["bytes_read"], "bytes_written": t["bytes_written"],
            "min_bytes": spec.bytes(case.d, dtype, mode),
            "distinct_bytes_read": t["distinct_bytes_read"], "distinct_bytes_written": t["distinct_bytes_written"],
            "flops": t["flops"], "useful_flops": t["useful_flops"],
            "lane_ops": t["lane_ops"], "transcendental_ops": t["transcendental_ops"],
            "launches": len(launches),
            "max_grid": max((launch["grid"] for launch in triton), default=None),
            "peak_bytes": counted["peaks"][mode],
            "predicted_ms": {name: p["ms"] for name, p in predictions.items()},
            "bound": {name: p["bound"] for name, p in predictions.items()},
            "predicted_ms_perfect_cache": {name: p["ms"] for name, p in cached.items()},
            # the model calibrated on published GPU measurements (benchmarks/calibrate.py), one timed call
            "predicted_ms_calibrated": {key: model.CalibratedModel().call_ms(
                timeline, model.GPUS[key], "liger" if provider == "fused" else "huggingface")
                for key in CALIBRATED_GPUS},
            # what that model reads of each launch (host-only launches included), in issue order within a
            # phase (for re-pricing with refitted parameters: calibrate.py --ledger)
            "timeline": [model.timeline_entry(launch) for launch in timeline],
            "dot_flops_by_precision": t["dot_flops_by_precision"], "lane_ops_by_kind": t["lane_ops_by_kind"],
            "atomic_lanes": t["atomic_lanes"], "atomic_max_per_address": t["atomic_max_per_address"],
            "triton_launches": len(triton), "syncs": counted["syncs"],
            "scaling": counted.get("scaling"),
            "sampled_programs": {launch["name"]: [launch["sampled_programs"], launch["grid"]] for launch in triton
                                 if launch.get("sampled_programs")},
            "kernels": kernel_breakdown(launches),
        })
    return rows


# --------------------------------------------------------------------------------------- driver
def _commit() -> str:
    """The commit counted, with "+changes" when kernels/ or incrementer_fast/ differ from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "kernels", "incrementer_fast"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


def environment(argv: list[str], plan: str) -> dict:
    import triton

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(argv),
        "commit": _commit(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "plan": plan,
        "note": "Every number is counted on the CPU or modelled from those counts; nothing is measured on a GPU.",
    }


def run(args, argv) -> dict:
    ops = [op for op in args.ops.split(",") if op] or list(W.OPS)
    unknown = set(ops) - set(W.OPS)
    if unknown:
        raise SystemExit(f"--ops: unknown {sorted(unknown)} (known: {', '.join(W.OPS)})")
    dtypes = [d for d in args.dtype.split(",") if d]
    providers = [p for p in args.providers.split(",") if p]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: {d!r} is not one of {', '.join(DTYPES)}")
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"--providers: {p!r} is not one of {', '.join(PROVIDERS)}")
    from incrementer_fast.kernels import utils as kernel_utils

    plan = args.plan
    if args.plan != "interpreter":
        # Count the 16-bit tl.dot operands a GPU issues (the values are not checked): see ledger.py.
        kernel_utils.UPCAST_BF16_DOTS = False
        plan += " (16-bit tl.dot operands as on a GPU)"

    cases = [parse_case(text) for text in args.case] if args.case else \
        [case for case in W.cases(args.size) if case.op in ops]
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    scaled = args.scale == "on" or (args.scale == "auto" and args.size == "paper" and not args.case)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    ledger = {"schema_version": SCHEMA_VERSION, "size": "custom" if args.case else args.size,
              "environment": environment(argv, plan),
              "devices": {name: device.to_json() for name, device in model.DEVICES.items()},
              "model": {"launch_us": model.LAUNCH_US, "int_divmod_cost": model.INT_DIVMOD_COST,
                        "doc": model.__doc__},
              "rows": [], "runs": [], "step": None}
    counted_cases = []
    for case in cases:
        for dtype_name in dtypes:
            for provider in providers:
                if provider == "fused" and scaled:
                    counted = count_fused_scaled(case, DTYPES[dtype_name], print)
                else:
                    counted = count_case(case, DTYPES[dtype_name], provider)
                run_info = {"op": case.op, "case": case.title, "dtype": dtype_name, "provider": provider,
                            "wall_s": counted["wall_s"], "interpreter_s": counted["interpreter_s"],
                            "custom_ops": counted["custom_ops"]}
                if args.overhead and provider == "fused":
                    # The same run without instrumentation: the case itself, or its first (smallest) sample.
                    timed, instrumented_s = counted.get("sample_runs", [(case, counted["wall_s"])])[0]
                    run_info["overhead"] = {"case": timed.shape_text, "instrumented_s": instrumented_s,
                                            "plain_s": plain_interpreter_seconds(timed, DTYPES[dtype_name])}
                ledger["runs"].append(run_info)
                counted_cases.append((case, dtype_name, provider, counted))
                print(f"[ledger] {case.op} [{case.title}] {dtype_name} {provider}: {counted['wall_s']:.1f} s",
                      flush=True)
    # one compiler process for every fused launch of the run (its start-up costs seconds); H100 and H200
    # are both compute capability 9.0
    ledger["compile"] = ledger_compile.attach_usage([launch for _, _, provider, counted in counted_cases
                                                     if provider == "fused" for launch in counted["launches"]], 90)
    for case, dtype_name, provider, counted in counted_cases:
        ledger["rows"].extend(rows_for(case, dtype_name, provider, counted))
    if not args.no_step and not args.case:
        import ledger_step

        ledger["step"] = ledger_step.step_memory(args.size)
    ledger["harness"] = {"wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu}
    return ledger
