"""Benchmark the fused ops against PyTorch eager and torch.compile, and a whole training step: one command.

    python benchmarks/run.py                       # CUDA when present: paper shapes, fp32 and bf16
    python benchmarks/run.py --quick               # tiny CPU shapes, seconds: checks the harness
    python benchmarks/run.py --device cuda --dtype fp32,bf16 --out runs/benchmarks --budget-s 200
    python benchmarks/run.py --no-ops --step-dtype bf16,fp32 --step-tf32 --merge --out DIR   # add the step

Writes ``results.json`` (every number, the environment, the calibration) and ``results.md`` (the tables)
into ``--out``, rewritten after every case so that a run stopped early keeps what it measured.

What each number is
-------------------
* time: median and 20th / 80th percentiles in ms. CUDA: ``triton.testing.do_bench`` (CUDA events, the L2
  cache flushed between repetitions); the training step: CUDA events around each of 10 steps. CPU:
  ``time.perf_counter`` around each repetition.
* peak MB: ``torch.cuda.max_memory_allocated`` during one call, minus the memory allocated just before
  it (the inputs, and in ``backward`` mode the forward's graph): what the op itself adds. The JSON also
  holds the absolute peak. Not measured on the CPU ("n/a").
* GB/s and % copy BW: the byte model of benchmarks/workloads.py (the minimum an op must move) divided by
  the median time, as a share of the device-to-device copy bandwidth measured at the start of the same
  run (a 1 GiB copy timed with do_bench, read + write bytes counted).
* bound: ``memory`` or ``compute`` (see workloads.py); for cosine_mask, by comparing its arithmetic
  intensity with the ridge point from this run's copy bandwidth and matmul peak (fp32 without TF32 for
  fp32 inputs, bf16 otherwise).

Targets (CUDA, fp32 and bf16, forward+backward rows of the fused provider)
--------------------------------------------------------------------------
* ``x_eager``: ≥ 2× faster than eager.
* ``x_compiled``: ≥ 1.3× faster than compiled — or, where compiled already runs near the copy bandwidth
  (≥ 65 %, so that 1.3× would need ≥ 85 %), the fused op at ≥ 85 % of the copy bandwidth instead.
* ``memory``: peak MB ≤ 0.5 × eager's.
* ``bandwidth``: memory-bound ops at ≥ 70 % of the copy bandwidth.
* ``memory_20x``, seg_head_loss, loss_stage and mib_head_loss at K = 151: peak MB ≥ 20× below eager (the
  reference path) and ≥ 2× faster (``x_eager``).
* the training step with the fused ops ≥ 1.3× faster than with the reference ops.

Order and budget: at the paper size the (case, dtype) pairs run in priority order
(``PRIORITY``: seg_head_loss and loss_stage at K = 151, cosine_mask K = 151 and 21, cds_dice_loss,
fod_loss, pseudo_label, the K = 21 seg head), so that a run cut short by ``--budget-s`` or by a signal
(SIGINT: the results measured so far are written, exit 130) keeps the numbers that matter most.
Each is PASS or MISS; ``n/a`` where it does not apply (CPU runs, ops without a backward), ``not measured``
where a number is missing (an error, a skipped provider, the fused op still being the reference).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads as W  # noqa: E402  (benchmarks/ is not a package)

import incrementer_fast as inc  # noqa: E402

MB = 2**20
TARGET_X_EAGER = 2.0
TARGET_X_COMPILED = 1.3
TARGET_MEMORY = 0.5
TARGET_BANDWIDTH = 0.70
NEAR_LIMIT_COMPILED = 0.85 / 1.3  # compiled at ≥ 65 % of copy BW: 1.3× over it would need ≥ 85 %
TARGET_BANDWIDTH_NEAR_LIMIT = 0.85
TARGET_MEMORY_20X = 20.0
TARGET_STEP = 1.3
# Priority order of the paper-size cases (the numbers that matter most first): (op, K or None), first to last.
PRIORITY = [("seg_head_loss", 151), ("loss_stage", 151), ("cosine_mask", 151), ("cosine_mask", 21),
            ("cds_dice_loss", 151), ("cds_dice_loss", 21), ("fod_loss", None), ("pseudo_label", None),
            ("seg_head_loss", 21)]


def in_priority_order(cases: list) -> list:
    """``cases`` sorted by ``PRIORITY`` (stable; cases it does not name keep their order, last)."""
    def rank(case):
        for index, (op, k) in enumerate(PRIORITY):
            if case.op == op and (k is None or case.d.get("K") == k):
                return index
        return len(PRIORITY)

    return sorted(cases, key=rank)


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of ``fn``; the caller has already warmed it up."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return float(median), float(p20), float(p80)
    samples = []
    reps, budget_s = (3, 0.5) if quick else (20, 2.0)
    start = time.perf_counter()
    while len(samples) < reps and (len(samples) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    median, p20, p80 = np.percentile(samples, [50, 20, 80])
    return float(median), float(p20), float(p80)


def time_step_ms(fn, device: torch.device, warmup: int, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of a long callable (a training step), timed one repetition at a time."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    median, p20, p80 = np.percentile(samples, [50, 20, 80])
    return float(median), float(p20), float(p80)


def peak_mb(fn, device: torch.device) -> tuple[float | None, float | None]:
    """(MB allocated above what was allocated before the call, absolute peak MB); (None, None) on CPU."""
    if device.type != "cuda":
        fn()
        return None, None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / MB, peak / MB


# ------------------------------------------------------------------------------------- calibration
def calibrate(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth (read + write bytes per second) and matmul peaks, measured on this device now."""
    result = {"copy_gbps": None, "copy_bytes": None, "matmul_tflops": {}}
    if device.type == "cuda":
        import triton.testing

        n_bytes = 2**30
        src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).normal_()
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
        result["copy_gbps"] = 2 * n_bytes / (ms * 1e-3) / 1e9
        result["copy_bytes"] = n_bytes
        del src, dst
        tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            for name, dtype, n in (("fp32", torch.float32, 4096), ("bf16", torch.bfloat16, 8192)):
                a = torch.randn(n, n, device=device, dtype=dtype)
                b = torch.randn(n, n, device=device, dtype=dtype)
                ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
                result["matmul_tflops"][name] = 2 * n**3 / (ms * 1e-3) / 1e12
                del a, b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.cuda.empty_cache()
    else:
        n_bytes = (16 if quick else 256) * MB
        src = torch.randn(n_bytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        ms, _, _ = time_ms(lambda: dst.copy_(src), device, quick)
        result["copy_gbps"] = 2 * n_bytes / (ms * 1e-3) / 1e9
        result["copy_bytes"] = n_bytes
    return result


# ------------------------------------------------------------------------------------- environment
def _xformers_version(device: torch.device) -> str:
    """The installed xformers version; on CUDA also whether it imports (its attention runs only there)."""
    from importlib import metadata

    try:
        version = metadata.version("xformers")
    except metadata.PackageNotFoundError:
        return "not installed"
    if device.type != "cuda":
        return version
    try:
        import xformers.ops  # noqa: F401
    except Exception as error:  # built for another torch, or a broken install
        return f"{version} (does not import: {type(error).__name__})"
    return version


def environment(device: torch.device, argv: list[str], compile_backend: str) -> dict:
    import triton

    xformers_version = _xformers_version(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/run.py " + " ".join(argv),
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "xformers": xformers_version,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "compile_backend": compile_backend,
        "incrementer_fast": inc.__version__,
    }
    return env


# ----------------------------------------------------------------------------------------- op rows
def _check(op: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    if W.OPS[op].compare == "mismatch":
        return float((a != e).double().mean())
    ref = torch.linalg.vector_norm(e).item()
    diff = torch.linalg.vector_norm(a - e).item()
    return diff / ref if ref > 0 else diff


def _provider_note(op: str, provider: str, device: torch.device, compile_backend: str) -> str:
    if provider == "fused":
        if W.fused_is_reference(op):
            return "fused op is still the reference (kernels not landed)"
        return f"backend={inc.backend(device)}"
    if provider == "compiled":
        return f"torch.compile(backend={compile_backend!r}, fullgraph=True, dynamic=False)"
    return "inc.reference"


def timed_modes(spec: W.OpSpec, requested: list[str]) -> list[str]:
    """The requested modes that ``spec``'s op has. An op without a backward (pseudo_label) is timed in its
    forward when forward+backward is requested (gpu_check's --modes): that forward is all it does in a
    training step, and the row its targets are judged on."""
    modes = [m for m in spec.modes if m in requested]
    if not modes and "forward+backward" in requested and "backward" not in spec.modes:
        modes = ["forward"]
    return modes


def measure_case(case: W.Case, dtype_name: str, device: torch.device, providers: list[str], modes: list[str],
                 calib: dict, quick: bool, compile_backend: str) -> list[dict]:
    spec = W.OPS[case.op]
    dtype = W.DTYPES[dtype_name]
    modes = timed_modes(spec, modes)
    rows = []
    inputs = W.make_inputs(case, device, dtype)
    eager_out = W.build(case.op, "eager")(*inputs.args).detach()
    for provider in providers:
        base = dict(op=case.op, case=case.key, title=case.title, shape=case.shape_text, size=case.size,
                    dtype=dtype_name, provider=provider)
        if provider == "fused" and device.type == "cpu":
            for mode in modes:
                rows.append(dict(base, mode=mode, status="skipped",
                                 note="fused is not timed on the CPU (Triton's interpreter is for correctness)"))
            continue
        note = _provider_note(case.op, provider, device, compile_backend)
        if provider == "fused":
            base["fused_is_reference"] = W.fused_is_reference(case.op)
        try:
            if provider == "compiled":
                torch._dynamo.reset()
            fn = W.build(case.op, provider, compile_backend)
            check = None if provider == "eager" else _check(case.op, fn(*inputs.args), eager_out)
        except Exception as error:  # a provider that cannot run this case is reported, not fatal
            for mode in modes:
                rows.append(dict(base, mode=mode, status="error", note=f"{note}; {_error_text(error)}"))
            _free(device)
            continue
        for mode in modes:
            row = dict(base, mode=mode, note=note, check=check)
            timed = None
            try:
                timed = W.mode_fn(fn, inputs, mode)
                timed()  # warm-up: compilation, autotuning, the allocator's caches
                timed()
                _sync(device)
                row["median_ms"], row["p20_ms"], row["p80_ms"] = time_ms(timed, device, quick)
                row["extra_mb"], row["peak_mb"] = peak_mb(timed, device)
                row["status"] = "ok"
                _roofline(row, spec, case, dtype, mode, calib)
            except Exception as error:
                row.update(status="error", note=f"{note}; {_error_text(error)}")
            del timed
            rows.append(row)
            _free(device)
    del inputs, eager_out
    _free(device)
    _speedups(rows)
    return rows


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return text[:300]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _roofline(row: dict, spec: W.OpSpec, case: W.Case, dtype: torch.dtype, mode: str, calib: dict) -> None:
    seconds = row["median_ms"] * 1e-3
    n_bytes = spec.bytes(case.d, dtype, mode)
    row["bytes"] = n_bytes
    row["gbps"] = n_bytes / seconds / 1e9
    copy = calib.get("copy_gbps")
    row["bw_pct"] = 100 * row["gbps"] / copy if copy else None
    bound = spec.bound
    if spec.flops is not None:
        flops = spec.flops(case.d, mode)
        row["flops"] = flops
        row["tflops"] = flops / seconds / 1e12
        peak = calib["matmul_tflops"].get("fp32" if dtype == torch.float32 else "bf16")
        row["flop_pct"] = 100 * row["tflops"] / peak if peak else None
        if bound == "roofline":
            ridge = peak * 1e12 / (copy * 1e9) if (peak and copy) else None
            row["intensity"] = flops / n_bytes
            bound = "n/a" if ridge is None else ("memory" if flops / n_bytes < ridge else "compute")
    row["bound"] = bound


def _speedups(rows: list[dict]) -> None:
    by_key = {(r["provider"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        for other, field in (("eager", "x_eager"), ("compiled", "x_compiled")):
            ref = by_key.get((other, row["mode"]))
            row[field] = ref["median_ms"] / row["median_ms"] if ref else None


# ------------------------------------------------------------------------------------------ targets
def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def evaluate_targets(rows: list[dict], device: torch.device, quick: bool) -> list[dict]:
    """One entry per (op, case, dtype): each target's value, bar and verdict (see the module docstring)."""
    targets = []
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["op"], row["case"], row["dtype"]), []).append(row)
    for (op, case, dtype), group in groups.items():
        spec = W.OPS[op]
        mode = "forward+backward" if "forward+backward" in spec.modes else "forward"
        pick = {r["provider"]: r for r in group if r["mode"] == mode}
        fused, eager, compiled = pick.get("fused"), pick.get("eager"), pick.get("compiled")
        entry = dict(op=op, case=case, title=group[0]["title"], dtype=dtype, mode=mode, results={})
        targets.append(entry)
        if device.type != "cuda" or quick:
            entry["results"] = {name: dict(verdict="n/a", why="targets are for CUDA runs at the paper's shapes")
                                for name in _target_names(spec, case)}
            continue
        missing = None
        if not fused or fused.get("status") != "ok":
            missing = "fused not measured" + (f" ({fused.get('note')})" if fused else "")
        elif fused.get("fused_is_reference"):
            missing = "the fused op is still the reference"
        for name in _target_names(spec, case):
            if missing:
                entry["results"][name] = dict(verdict="not measured", why=missing)
                continue
            entry["results"][name] = _one_target(name, spec, fused, eager, compiled)
    return targets


def _target_names(spec: W.OpSpec, case_key: str) -> list[str]:
    names = ["x_eager", "x_compiled", "memory"]
    if spec.bound in ("memory", "roofline"):
        names.append("bandwidth")
    if "memory_20x" in spec.targets and "K=151" in case_key:
        names.append("memory_20x")
    return names


def _ok(row) -> bool:
    return bool(row) and row.get("status") == "ok"


def _one_target(name: str, spec: W.OpSpec, fused: dict, eager: dict | None, compiled: dict | None) -> dict:
    """{verdict, text (the table cell), value, bar} of one target, or {verdict, why} when it cannot be judged."""
    if name == "x_eager":
        if not _ok(eager):
            return dict(verdict="not measured", why="eager not measured")
        value = fused["x_eager"]
        verdict = _verdict(value >= TARGET_X_EAGER)
        return dict(value=value, bar=f"≥ {TARGET_X_EAGER}×", verdict=verdict, text=f"{_f(value)}× {verdict}")
    if name == "x_compiled":
        if not _ok(compiled):
            return dict(verdict="not measured", why="compiled not measured")
        value = fused["x_compiled"]
        compiled_pct = compiled.get("bw_pct")
        near_limit = compiled_pct is not None and compiled_pct >= 100 * NEAR_LIMIT_COMPILED
        if fused.get("bound") == "memory" and near_limit:
            fused_pct = fused.get("bw_pct") or 0.0
            verdict = _verdict(fused_pct >= 100 * TARGET_BANDWIDTH_NEAR_LIMIT)
            return dict(value=value, bar=f"compiled at {compiled_pct:.0f}% of copy BW: fused ≥ 85% of it",
                        fused_bw_pct=fused_pct, verdict=verdict,
                        text=f"{_f(value)}× (compiled at {compiled_pct:.0f}% BW; fused {fused_pct:.0f}% ≥ 85%?) "
                             f"{verdict}")
        verdict = _verdict(value >= TARGET_X_COMPILED)
        return dict(value=value, bar=f"≥ {TARGET_X_COMPILED}×", verdict=verdict, text=f"{_f(value)}× {verdict}")
    if name in ("memory", "memory_20x"):
        if not _ok(eager) or eager.get("extra_mb") is None or fused.get("extra_mb") is None:
            return dict(verdict="not measured", why="peak memory not measured")
        if eager["extra_mb"] > 0:
            ratio = fused["extra_mb"] / eager["extra_mb"]
        else:
            ratio = 0.0 if fused["extra_mb"] <= 0 else math.inf
        if name == "memory":
            verdict = _verdict(ratio <= TARGET_MEMORY)
            return dict(value=ratio, bar=f"≤ {TARGET_MEMORY}× eager", verdict=verdict,
                        text=f"{_f(ratio)}× ({_f(fused['extra_mb'])} / {_f(eager['extra_mb'])} MB) {verdict}")
        below = 1 / ratio if ratio > 0 else math.inf
        verdict = _verdict(below >= TARGET_MEMORY_20X)
        return dict(value=below, bar=f"≥ {TARGET_MEMORY_20X:.0f}× below eager", verdict=verdict,
                    text=f"{_f(below)}× below {verdict}")
    if name == "bandwidth":
        if fused.get("bound") != "memory":
            return dict(verdict="n/a", why=f"bandwidth target: {fused.get('bound')}-bound at this shape and dtype")
        pct = fused.get("bw_pct")
        if pct is None:
            return dict(verdict="not measured", why="no copy bandwidth")
        verdict = _verdict(pct >= 100 * TARGET_BANDWIDTH)
        return dict(value=pct, bar=f"≥ {100 * TARGET_BANDWIDTH:.0f}% of copy BW", verdict=verdict,
                    text=f"{_f(pct)}% {verdict}")
    raise ValueError(name)


# --------------------------------------------------------------------------------- training step
def measure_step(step_case: W.StepCase, dtype_name: str, device: torch.device, quick: bool,
                 tf32: bool = False) -> list[dict]:
    """Fused vs reference ops in one training step. ``tf32``: fp32 steps let the backbone's matmuls and
    convolutions use TF32 (torch.backends' allow_tf32), as fp32 training on Ampere+ usually does; the fused
    ops are unaffected (cosine_mask's fp32 dots are 3×TF32 either way)."""
    rows = []
    amp = None if dtype_name == "fp32" else W.DTYPES[dtype_name]
    tf32 = tf32 and amp is None
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32 or saved_tf32[0]
    try:
        return _measure_step(step_case, dtype_name, device, quick, amp, tf32, rows)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32


def _measure_step(step_case, dtype_name, device, quick, amp, tf32, rows) -> list[dict]:
    for variant, fused in (("fused ops", True), ("reference ops", False)):
        row = dict(step=step_case.title, dtype=dtype_name, variant=variant,
                   autocast=str(amp).replace("torch.", "") if amp else "none", tf32=tf32)
        step = None
        try:
            step = W.TrainingStep(step_case, device, fused=fused, amp_dtype=amp)
            row["attention"] = step.attention_backend()
            warmup, reps = (1, 2) if quick else (3, 10)
            row["median_ms"], row["p20_ms"], row["p80_ms"] = time_step_ms(step, device, warmup, reps)
            step.model.zero_grad(set_to_none=True)  # the last step's gradients are not part of the baseline
            row["extra_mb"], row["peak_mb"] = peak_mb(step, device)
            torch.manual_seed(0)  # same dropout masks for both variants: their losses must agree
            row["loss"] = float(step())
            row["status"] = "ok"
        except Exception as error:
            row.update(status="error", note=_error_text(error))
            traceback.print_exc()
        finally:
            step = None  # the two variants' networks never share the device
        rows.append(row)
        _free(device)
    fused_row, reference_row = rows
    if fused_row.get("status") == "ok" and reference_row.get("status") == "ok":
        fused_row["x_reference"] = reference_row["median_ms"] / fused_row["median_ms"]
        difference = abs(fused_row["loss"] - reference_row["loss"])
        fused_row["loss_rel_diff"] = difference / max(abs(reference_row["loss"]), 1e-30)
        if device.type == "cuda" and not quick:
            fused_row["target"] = _verdict(fused_row["x_reference"] >= TARGET_STEP)
        else:
            fused_row["target"] = "n/a"
    else:
        fused_row["target"] = "not measured"
    return rows


# -------------------------------------------------------------------------------------------- output
def _f(value, digits=3, suffix="") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    if abs(value) >= 100:
        return f"{value:.0f}{suffix}"
    return f"{value:.{digits}g}{suffix}"


def _target_cell(result: dict | None) -> str:
    if not result:
        return "—"
    return result.get("text", result["verdict"])


def render_markdown(report: dict) -> str:
    env, calib = report["environment"], report["calibration"]
    lines = ["# Benchmark results", ""]
    if report.get("partial"):
        lines += ["**Partial: the run stopped before every case was measured.**", ""]
    if env["device"] == "cpu":
        lines += ["**CPU run: these numbers check the harness; they are not the library's performance "
                  "(the fused provider is not timed on the CPU).**", ""]
    lines += [
        f"- card: {env['card']} ({env['device']}); torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}, xformers {env['xformers']}, Python {env['python']}",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- compiled provider: torch.compile(backend={env['compile_backend']!r}, fullgraph=True, dynamic=False)"
        " of the reference",
        f"- copy bandwidth (read + write of a {_f(calib['copy_bytes'] / MB)} MiB copy): "
        f"{_f(calib['copy_gbps'])} GB/s; matmul peaks: "
        + (", ".join(f"{k} {_f(v)} TFLOP/s" for k, v in calib["matmul_tflops"].items()) or "not measured"),
        "- time: median (p20–p80) ms; peak MB: allocated above what was allocated before the call; "
        "% BW: minimum bytes (benchmarks/workloads.py) / time / copy bandwidth",
        "",
        "## Targets (fused, forward+backward; CUDA)",
        "",
        "| op | case | dtype | ×eager (≥ 2) | ×compiled (≥ 1.3 or ≥ 85% BW) | peak vs eager (≤ 0.5) "
        "| % copy BW (≥ 70%, memory-bound) | memory ≥ 20× below (K = 151) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        res = t["results"]
        lines.append(
            f"| {t['op']} | {t['title']} | {t['dtype']} | {_target_cell(res.get('x_eager'))} | "
            f"{_target_cell(res.get('x_compiled'))} | {_target_cell(res.get('memory'))} | "
            f"{_target_cell(res.get('bandwidth'))} | {_target_cell(res.get('memory_20x'))} |")
    why = sorted({r.get("why") for t in report["targets"] for r in t["results"].values() if r.get("why")})
    if why:
        lines += [""] + [f"- {w}" for w in why]
    lines += ["", "## Training step (teacher forward + student forward + all losses + backward)", ""]
    if report["step"]:
        lines += ["| step | dtype | variant | attention | median ms | p20–p80 | peak MB | × reference (≥ 1.3) "
                  "| loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in report["step"]:
            if s.get("status") != "ok":
                lines.append(f"| {s['step']} | {s['dtype']} | {s['variant']} | — | {s.get('status')}: "
                             f"{s.get('note', '')} | | | | |")
                continue
            speed = f"{_f(s['x_reference'])} {s['target']}" if "x_reference" in s else ""
            dtype_cell = s["dtype"] + (" (TF32 backbone)" if s.get("tf32") else "")
            lines.append(f"| {s['step']} | {dtype_cell} | {s['variant']} | {s.get('attention')} | "
                         f"{_f(s['median_ms'])} | {_f(s['p20_ms'])}–{_f(s['p80_ms'])} | {_f(s.get('extra_mb'))} | "
                         f"{speed} | {s['loss']:.6g} |")
        lines += ["", "Loss: one step at a fixed seed (the same dropout masks for both variants); the two "
                  "variants compute the same loss up to float rounding."]
    else:
        lines.append("not run")
    lines += ["", "## Per op", ""]
    cases: dict = {}
    for row in report["rows"]:
        cases.setdefault(row["case"], []).append(row)
    for key, rows in cases.items():
        lines += [f"### {rows[0]['op']} — {rows[0]['title']} ({rows[0]['shape']})", "",
                  "| dtype | mode | provider | median ms | p20–p80 | peak MB | ×eager | ×compiled | GB/s "
                  "| % copy BW | TFLOP/s | bound | err vs eager | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        shown_skips = set()
        for r in rows:
            if r.get("status") == "skipped":
                if (r["dtype"], r["provider"]) not in shown_skips:
                    shown_skips.add((r["dtype"], r["provider"]))
                    lines.append(f"| {r['dtype']} | all | {r['provider']} | skipped | | | | | | | | | | "
                                 f"{r.get('note', '')} |")
                continue
            if r.get("status") != "ok":
                lines.append(f"| {r['dtype']} | {r['mode']} | {r['provider']} | {r.get('status')} | | | | | | | | | "
                             f"| {r.get('note', '')} |")
                continue
            lines.append(
                f"| {r['dtype']} | {r['mode']} | {r['provider']} | {_f(r['median_ms'])} | "
                f"{_f(r['p20_ms'])}–{_f(r['p80_ms'])} | {_f(r.get('extra_mb'))} | {_f(r.get('x_eager'))} | "
                f"{_f(r.get('x_compiled'))} | {_f(r.get('gbps'))} | {_f(r.get('bw_pct'), suffix='%')} | "
                f"{_f(r.get('tflops'))} | {r.get('bound')} | {_f(r.get('check'))} | {r.get('note', '')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "results.md").write_text(render_markdown(report), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="comma list of fp32, bf16, fp16 (default fp32,bf16; "
                                                      "--quick: fp32)")
    parser.add_argument("--size", choices=("paper", "small", "tiny"), default=None,
                        help="case sizes (default: paper on CUDA, small on CPU, tiny with --quick)")
    parser.add_argument("--ops", default=",".join(W.OPS), help="comma list of ops")
    parser.add_argument("--providers", default=",".join(W.PROVIDERS), help="comma list of providers")
    parser.add_argument("--modes", default=",".join(W.MODES), help="comma list of modes")
    parser.add_argument("--no-step", action="store_true", help="skip the whole training step")
    parser.add_argument("--no-ops", action="store_true", help="skip the op cases (only the training step)")
    parser.add_argument("--step-dtype", default=None,
                        help="comma list of the training step's dtypes (default: --dtype)")
    parser.add_argument("--step-tf32", action="store_true",
                        help="fp32 training steps with TF32 allowed for the backbone (stated in the results)")
    parser.add_argument("--order", choices=("priority", "listed"), default="priority",
                        help="case order: PRIORITY, most important first (default), or workloads.py's listing")
    parser.add_argument("--merge", action="store_true",
                        help="add to the results.json already in --out instead of starting a new one")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled provider (default inductor; --quick: "
                             "aot_eager, which traces the same graph in seconds but generates no kernels)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting op cases after this many seconds (the step still runs)")
    parser.add_argument("--out", default="runs/benchmarks", help="folder for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="tiny CPU shapes: checks the harness in seconds")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own; --quick: 1, tiny ops gain nothing "
                             "from more and a shared machine stays responsive)")
    args = parser.parse_args(argv)
    if args.threads is None and args.quick:
        args.threads = 1
    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    args.dtype = args.dtype or ("fp32" if args.quick else "fp32,bf16")
    args.step_dtype = args.step_dtype or args.dtype
    args.size = args.size or ("tiny" if args.quick else ("paper" if args.device == "cuda" else "small"))
    args.compile_backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    for name, allowed in (("dtype", W.DTYPES), ("step_dtype", W.DTYPES), ("ops", W.OPS), ("providers", W.PROVIDERS),
                          ("modes", W.MODES)):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            parser.error(f"--{name}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
        setattr(args, name, values)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    out = Path(args.out)
    started = time.perf_counter()
    previous = out / "results.json"
    if args.merge and previous.exists():
        report = json.loads(previous.read_text(encoding="utf-8"))
        report["environment"].setdefault("commands", [report["environment"]["command"]])
        report["environment"]["commands"].append("python benchmarks/run.py " + " ".join(argv))
    else:
        report = {"environment": environment(device, argv, args.compile_backend), "partial": True,
                  "quick": args.quick, "size": args.size, "rows": [], "targets": [], "step": []}
        report["calibration"] = calibrate(device, args.quick)
    print(f"[bench] {report['environment']['card']}: copy {report['calibration']['copy_gbps']:.0f} GB/s, "
          f"matmul {report['calibration']['matmul_tflops']}", flush=True)
    try:
        skipped = _run(args, device, report, out, started)
    except KeyboardInterrupt:  # a time box's SIGINT: keep what was measured
        report["partial"] = True
        report["interrupted"] = True
        write(report, out)
        print(f"[bench] interrupted after {time.perf_counter() - started:.0f} s; wrote what was measured", flush=True)
        return 130
    report["partial"] = bool(skipped) or bool(report.get("skipped_for_budget"))
    report["seconds"] = report.get("seconds", 0.0) + time.perf_counter() - started
    write(report, out)
    print(f"[bench] wrote {out / 'results.json'} and {out / 'results.md'} in {report['seconds']:.0f} s", flush=True)
    return 0


def _run(args, device: torch.device, report: dict, out: Path, started: float) -> list[str]:
    # Time kept for the training step (two variants per dtype, ~10 s each on an H100 at fp32).
    step_reserve = 0.0 if args.no_step else (60.0 if device.type == "cuda" else 20.0)
    skipped = []
    cases = [] if args.no_ops else [c for c in W.cases(args.size) if c.op in args.ops]
    if args.order == "priority":
        cases = in_priority_order(cases)
    for case in cases:
        for dtype_name in args.dtype:
            elapsed = time.perf_counter() - started
            if args.budget_s is not None and elapsed > args.budget_s - step_reserve:
                skipped.append(f"{case.key} {dtype_name}")
                continue
            rows = measure_case(case, dtype_name, device, args.providers, args.modes, report["calibration"],
                                args.quick, args.compile_backend)
            report["rows"] += rows
            report["targets"] = evaluate_targets(report["rows"], device, args.quick)
            write(report, out)
            done = [f"{r['provider']}/{r['mode']}={_f(r.get('median_ms'))}" for r in rows if r.get("status") == "ok"]
            print(f"[bench] {time.perf_counter() - started:6.1f}s {case.key} {dtype_name}: {' '.join(done)}",
                  flush=True)
    if skipped:
        report["skipped_for_budget"] = report.get("skipped_for_budget", []) + skipped
        print(f"[bench] skipped for the time budget: {skipped}", flush=True)
    if not args.no_step:
        step_case = W.STEP_CASES["tiny" if args.size == "tiny" else "paper"]
        for dtype_name in args.step_dtype:
            report["step"] += measure_step(step_case, dtype_name, device, args.quick, tf32=args.step_tf32)
            write(report, out)
            print(f"[bench] {time.perf_counter() - started:6.1f}s step {dtype_name}: "
                  + " ".join(f"{s['variant']}={_f(s.get('median_ms'))}" for s in report["step"][-2:]), flush=True)
    return skipped


if __name__ == "__main__":
    sys.exit(main())
