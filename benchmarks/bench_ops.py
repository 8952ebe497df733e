"""pytest-benchmark suite: every op × provider (fused, eager, compiled) × mode × dtype.

    pytest benchmarks/ --benchmark-only                              # CUDA: paper shapes, fp32
    pytest benchmarks/ --benchmark-only --bench-dtype fp32,bf16 -k "cds_dice_loss and forward+backward"
    pytest benchmarks/ --benchmark-only --bench-device cpu           # small CPU shapes, eager and compiled

For tracking regressions between commits (``--benchmark-autosave`` / ``--benchmark-compare``). The numbers
reported in benchmarks/RESULTS.md come from benchmarks/run.py, which uses ``triton.testing.do_bench``
(CUDA events, L2 flushed) and adds peak memory, bandwidth and the targets. Here a CUDA round is the call
followed by ``torch.cuda.synchronize()``, so each round also pays the host's launch and synchronisation
latency (a few µs): compare these numbers with each other, not with run.py's.
"""
from __future__ import annotations

import torch

import workloads as W


def test_op(benchmark, bench_params, device, compile_backend):
    case, dtype_name, provider, mode = bench_params
    spec = W.OPS[case.op]
    dtype = W.DTYPES[dtype_name]
    if provider == "compiled":
        torch._dynamo.reset()  # one compiled graph per test; no cache entries left from earlier tests
    inputs = W.make_inputs(case, device, dtype)
    timed = W.mode_fn(W.build(case.op, provider, compile_backend), inputs, mode)

    def round_():
        result = timed()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    round_()  # compilation, autotuning, allocator warm-up
    round_()
    benchmark.extra_info.update(
        op=case.op, case=case.key, dtype=dtype_name, provider=provider, mode=mode,
        min_bytes=spec.bytes(case.d, dtype, mode),
        fused_is_reference=W.fused_is_reference(case.op) if provider == "fused" else None,
    )
    result = benchmark(round_)
    outputs = result if isinstance(result, tuple) else (result,)
    assert all(torch.isfinite(t.float()).all() for t in outputs if t.is_floating_point()), \
        f"{case.key} {provider} {mode}: non-finite output"
