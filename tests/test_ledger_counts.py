"""The ledger's counters against hand-computed values.

Small Triton kernels defined here run through Triton's interpreter under ``ledger_count.KernelCounter``:
a tiled matrix product whose tiles cover the shape exactly, the same kernel on a shape with masked edges,
an elementwise kernel (transcendentals), and a histogram with integer atomics on a hot address. Every
counted quantity is compared with its value worked out by hand below. Kernels of this file, not the
library's, so that the test checks the instrument and does not change whenever a library kernel is
rewritten. The aten counter and the live-byte tracker are checked the same way.

The Triton part needs ``TRITON_INTERPRET=1`` set before triton is imported; under the suite's reference
pass (no interpreter) ``test_counts_under_the_interpreter`` re-runs this file in a subprocess with it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess")

if INTERPRET:
    import triton
    import triton.language as tl

    from ledger_count import KernelCounter

    @triton.jit
    def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        rows = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                        other=0.0)
            b = tl.load(b_ptr + ks[:, None] * N + cols[None, :], mask=(ks[:, None] < K) & (cols[None, :] < N),
                        other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < N))

    @triton.jit
    def _softplus_ratio_kernel(x_ptr, y_ptr, out_ptr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets)  # unmasked: the grid covers the tensor exactly
        y = tl.load(y_ptr + offsets)
        tl.store(out_ptr + offsets, tl.log(1.0 + tl.exp(x)) / y)

    @triton.jit
    def _histogram_kernel(values_ptr, hist_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < n
        bins = tl.load(values_ptr + offsets, mask=valid, other=0)
        tl.atomic_add(hist_ptr + bins, tl.full((BLOCK,), 1, tl.int32), mask=valid)


    @triton.jit
    def _weighted_rows_kernel(x_ptr, w_ptr, out_ptr, rows_per_program, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        w = tl.load(w_ptr + cols, mask=cols < n, other=0.0)  # once per program
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for r in range(rows_per_program):  # one load per row: a dependent round trip each
            x = tl.load(x_ptr + (pid * rows_per_program + r) * n + cols, mask=cols < n, other=0.0)
            acc += x * w
        tl.store(out_ptr + pid * BLOCK + cols, acc)


def _only_launch(counter):
    assert len(counter.launches) == 1, [launch.name for launch in counter.launches]
    return counter.launches[0]


def _matmul(m, n, k, block, precision="ieee", dtype=torch.float32):
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    c = torch.empty(m, n)
    grid = (triton.cdiv(m, block) * triton.cdiv(n, block),)
    with KernelCounter() as counter:
        _matmul_kernel[grid](a, b, c, m, n, k, BLOCK_M=block, BLOCK_N=block, BLOCK_K=block, PRECISION=precision)
    return _only_launch(counter), grid[0]


@needs_interpreter
def test_tiles_covering_the_shape_exactly():
    m = n = k = 32
    launch, grid = _matmul(m, n, k, block=16)
    assert launch.name == "_matmul_kernel" and launch.kind == "triton"
    assert launch.grid == grid == 4
    assert launch.config["BLOCK_M"] == 16 and launch.config["PRECISION"] == "ieee"
    # Each of the 4 programs takes 2 K-steps, each loading a 16×16 tile of A and of B (fp32): all lanes active.
    assert launch.bytes_read == 4 * 2 * (16 * 16 + 16 * 16) * 4 == 16384
    assert launch.bytes_written == m * n * 4 == 4096
    # With a perfect cache each tensor once: A and B are each read by two programs.
    assert launch.distinct_bytes_read == (m * k + k * n) * 4 == 8192
    assert launch.distinct_bytes_written == 4096
    # 8 dots of 16×16×16: 2·16³ FLOPs each, all of them on non-zero operands.
    assert dict(launch.dot_flops) == {"fp32_ieee": 8 * 2 * 16**3}
    assert launch.useful_dot_flops == 2 * m * n * k == 65536
    assert dict(launch.dot_shapes) == {"16x16x16": 8}
    assert launch.transcendental_ops == 0 and launch.atomic_lanes == 0


@needs_interpreter
def test_tiles_with_masked_edges():
    m, n, k = 20, 24, 40  # 2 × 2 output tiles of 16, 3 K-steps, every tile edge partly masked
    launch, grid = _matmul(m, n, k, block=16)
    assert launch.grid == grid == 4
    # Only active lanes count: A (20×40) is read once per column tile (2), B (40×24) once per row tile (2).
    assert launch.bytes_read == (2 * m * k + 2 * k * n) * 4 == 14080
    assert launch.bytes_written == m * n * 4 == 1920
    assert launch.distinct_bytes_read == (m * k + k * n) * 4 == 7040
    assert launch.distinct_bytes_written == 1920
    # Issued: 4 programs × 3 steps of full 16×16×16 dots; useful: the products of the unpadded operands.
    assert dict(launch.dot_flops) == {"fp32_ieee": 4 * 3 * 2 * 16**3} == {"fp32_ieee": 98304}
    assert launch.useful_dot_flops == 2 * m * n * k == 38400


@needs_interpreter
def test_dot_precision_is_the_one_issued():
    launch, _ = _matmul(16, 16, 16, block=16, precision="tf32")
    assert dict(launch.dot_flops) == {"fp32_tf32": 2 * 16**3}
    launch, _ = _matmul(16, 16, 16, block=16, precision="tf32x3")
    assert dict(launch.dot_flops) == {"fp32_tf32x3": 2 * 16**3}
    launch, _ = _matmul(16, 16, 16, block=16, dtype=torch.float16)
    assert dict(launch.dot_flops) == {"fp16": 2 * 16**3}
    assert launch.bytes_read == 2 * 16 * 16 * 2  # two fp16 tiles


@needs_interpreter
def test_elementwise_lanes_and_transcendentals():
    block, programs = 64, 3
    x = torch.randn(block * programs)
    y = torch.rand(block * programs) + 1.0
    out = torch.empty_like(x)
    with KernelCounter() as counter:
        _softplus_ratio_kernel[(programs,)](x, y, out, BLOCK=block)
    launch = _only_launch(counter)
    lanes = block * programs
    assert launch.bytes_read == 2 * lanes * 4 and launch.bytes_written == lanes * 4
    assert launch.transcendental_ops == 3 * lanes  # exp, log and the division, per lane
    assert launch.lane_ops["float"] == lanes  # 1.0 + e
    assert launch.flops == 0
    torch.testing.assert_close(out, torch.log1p(torch.exp(x)) / y)


@needs_interpreter
def test_a_sample_of_identical_programs_counts_the_whole_grid():
    """KernelCounter(sample_programs=m) interprets m programs of a larger grid and scales the counts: exact when
    every program does the same work (here: no masked edge), and only those m programs write their output."""
    block, programs, sampled = 16, 8, 3
    x = torch.randn(block * programs)
    y = torch.rand(block * programs) + 1.0
    with KernelCounter() as counter:
        _softplus_ratio_kernel[(programs,)](x, y, torch.empty_like(x), BLOCK=block)
    full = _only_launch(counter)
    out = torch.zeros(block * programs)
    with KernelCounter(sample_programs=sampled) as counter:
        _softplus_ratio_kernel[(programs,)](x, y, out, BLOCK=block)
    launch = _only_launch(counter)
    assert (launch.sampled_programs, full.sampled_programs, launch.grid) == (sampled, 0, programs)
    for name in ("bytes_read", "bytes_written", "transcendental_ops", "distinct_bytes_read", "distinct_bytes_written"):
        assert getattr(launch, name) == getattr(full, name), name
    assert launch.lane_ops == full.lane_ops
    written = (out.view(programs, block) != 0).all(dim=1)
    assert int(written.sum()) == sampled and not (out.view(programs, block)[~written] != 0).any()


@needs_interpreter
def test_atomics_count_active_lanes_and_the_hottest_address():
    values = torch.tensor([0, 1, 0, 2, 0, 0, 3, 1, 0, 0], dtype=torch.int32)  # bin 0 six times
    hist = torch.zeros(4, dtype=torch.int32)
    with KernelCounter() as counter:
        _histogram_kernel[(2,)](values, hist, values.numel(), BLOCK=8)
    launch = _only_launch(counter)
    assert hist.tolist() == [6, 2, 1, 1]
    assert launch.atomic_lanes == 10  # 16 lanes issued, 6 masked off
    assert launch.bytes_written == 10 * 4
    assert launch.bytes_read == 10 * 4  # the masked load of the values
    assert launch.distinct_bytes_written == hist.numel() * 4  # ten updates of a 16-byte histogram
    assert launch.distinct_bytes_read == 10 * 4
    assert launch.atomic_max_per_address == 6


# Counts that depend on the data, not only on the shapes: the extrapolation estimates them (see ledger_scale).
DATA_DEPENDENT = ("useful_dot_flops", "atomic_lanes", "atomic_max_per_address")


@needs_interpreter
@pytest.mark.skipif(os.environ.get("INCREMENTER_FAST_PLAN") != "h100",
                    reason="the ledger plans launches for an H100 (the re-run below sets it)")
@pytest.mark.parametrize("text", [
    "cosine_mask:B=4,N=512,D=32,K=5",  # images and patches
    # (the seg-head ops and cds_dice_loss are not extrapolated: workloads.PROGRAM_SAMPLED_OPS)
])
def test_scaled_counts_equal_a_direct_count(text):
    """The per-dimension extrapolation behind --size paper, and the launch plan on fake tensors, against
    counting the same case directly."""
    import ledger_run
    import ledger_scale

    case = ledger_run.parse_case(text)
    plan = ledger_run.launch_plan(case, torch.float32)
    choice = ledger_scale.choose_axes(case, plan, lambda sample: ledger_run.launch_plan(sample, torch.float32))
    assert choice is not None, "no sampling reproduces the launch plan"
    direct = ledger_run.count_case(case, torch.float32, "fused")
    # The plan (no kernel executed) is the direct run's launches, tiles, grids, torch ops and peaks.
    assert [ledger_scale.signature(launch) for launch in plan["launches"]] == \
        [ledger_scale.signature(launch) for launch in direct["launches"]]
    for planned, counted in zip(plan["launches"], direct["launches"]):
        assert planned["grid"] == counted["grid"]
        if planned["kind"] == "aten":
            assert (planned["bytes_read"], planned["bytes_written"]) == (counted["bytes_read"], counted["bytes_written"])
    assert plan["peaks"] == direct["peaks"]
    scaled = ledger_run.count_fused_scaled(case, torch.float32, log=lambda message: None)
    assert scaled["scaling"]["exact"], scaled["scaling"]["non_integral"]
    for ours, theirs in zip(scaled["launches"], direct["launches"]):
        assert ledger_scale.signature(ours) == ledger_scale.signature(theirs)
        for field in ledger_scale.ADDITIVE_FIELDS + ledger_scale.COUNTER_FIELDS:
            if field in DATA_DEPENDENT:
                continue
            expected = theirs[field]
            if isinstance(expected, dict):
                expected = {k: v for k, v in expected.items() if v}
            assert ours[field] == expected, (ours["name"], field)
    assert scaled["peaks"] == direct["peaks"]


@needs_interpreter
def test_load_rounds_are_the_busiest_load_site_and_arguments_are_counted():
    programs, rows, n, block = 3, 5, 24, 32
    x = torch.randn(programs * rows, n)
    w = torch.randn(n)
    out = torch.empty(programs, block)
    with KernelCounter() as counter:
        _weighted_rows_kernel[(programs,)](x, w, out, rows, n, BLOCK=block)
    launch = _only_launch(counter)
    assert launch.load_calls == programs * (1 + rows)
    assert sorted(launch.load_sites.values()) == [programs, programs * rows]  # the weight's site, the rows'
    assert launch.load_rounds == programs * rows
    assert launch.num_args == 6  # x, w, out, rows_per_program, n and the constexpr BLOCK
    assert launch.compile_request["name"] == "_weighted_rows_kernel"
    assert launch.compile_request["args"][0] == {"tensor": "float32", "aligned": True}
    assert launch.compile_request["kwargs"]["BLOCK"] == {"value": block}


def test_aten_counter_aliases_gathers_classes_and_host_ops():
    from ledger_count import AtenCounter

    x = torch.randn(64, 32)
    logits = torch.randn(16, 1000)
    target = torch.randint(0, 1000, (16,))
    with AtenCounter(record_host_ops=True) as counter:
        x.add_(x)  # the same tensor twice: read once
        x.t().contiguous()  # a transposed operand: the copy is strided
        x * 2.0  # dense
        torch.nn.functional.nll_loss(logits, target)  # reads one logit per target, not the 64 KB of logits
        x.view(32, 64)  # a view: a host launch, no GPU work
        torch.equal(x, x)  # no tensor result (a Python bool): still classified
    kinds = [(launch.kind, launch.name.split(".")[1]) for launch in counter.launches]
    add, copy, mul, nll, _ = [launch for launch in counter.launches if launch.kind == "aten"]
    assert (add.bytes_read, add.bytes_written) == (64 * 32 * 4, 64 * 32 * 4)
    assert (add.op_class, copy.op_class, mul.op_class) == ("pointwise", "strided", "pointwise")
    assert nll.bytes_read == 16 * 8 + 16 * 4  # the targets (int64) and the 16 picked fp32 logits
    from ledger_count import _aten_matmul_precision

    seed = torch.zeros(2, dtype=torch.int64)  # attention's backward takes its philox seed and offset last
    assert _aten_matmul_precision((torch.ones(2, dtype=torch.bfloat16), seed, seed)) == "bf16"
    assert ("host", "view") in kinds
    assert all(launch.bytes_read == launch.bytes_written == 0 for launch in counter.launches if launch.kind == "host")


def test_aten_counter_bytes_flops_and_live_memory():
    from torch.utils.flop_counter import FlopCounterMode

    from ledger_count import AtenCounter

    a = torch.randn(4, 8, 16, device="meta")
    b = torch.randn(4, 16, 32, device="meta")
    row = torch.randn(32, device="meta")
    with AtenCounter() as counter:
        c = torch.bmm(a, b)  # reads a and b, writes c (4·8·32 fp32)
        d = c + row.expand(4, 8, 32)  # an expanded (stride-0) input: its 32 distinct values count once
        del c
        d.mul_(2.0)  # in place: reads and writes d
        e = d.view(4, 256)  # a view: no launch
    names = [launch.name for launch in counter.launches]
    assert names == ["aten.bmm.default", "aten.add.Tensor", "aten.mul_.Tensor"]
    bmm, add, mul = counter.launches
    assert (bmm.bytes_read, bmm.bytes_written) == ((4 * 8 * 16 + 4 * 16 * 32) * 4, 4 * 8 * 32 * 4)
    assert (add.bytes_read, add.bytes_written) == ((4 * 8 * 32 + 32) * 4, 4 * 8 * 32 * 4)
    assert (mul.bytes_read, mul.bytes_written) == (4 * 8 * 32 * 4, 4 * 8 * 32 * 4)
    with FlopCounterMode(display=False) as flop_counter:
        torch.bmm(a, b)
    assert dict(bmm.dot_flops) == {"fp32_ieee": flop_counter.get_total_flops()} == {"fp32_ieee": 2 * 4 * 8 * 32 * 16}
    # Live bytes: c and d (4 KiB each) were alive together once; c freed, the in-place op and the view add none.
    assert counter.live.peak == 2 * 4 * 8 * 32 * 4
    assert counter.live.sample() == 4 * 8 * 32 * 4
    assert e.shape == (4, 256)


@pytest.mark.skipif(INTERPRET, reason="this is the re-run itself")
def test_counts_under_the_interpreter():
    """Run this file's Triton tests with TRITON_INTERPRET=1 (triton must see it before its import)."""
    env = dict(os.environ, TRITON_INTERPRET="1", INCREMENTER_FAST_PLAN="h100")  # as benchmarks/ledger.py
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "10 passed, 1 skipped" in proc.stdout, proc.stdout[-2000:]  # everything ran but this test
