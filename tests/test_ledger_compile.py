"""benchmarks/ledger_compile.py: Triton launches compiled for sm_90 without a GPU.

The calibrated model takes registers, spills and shared memory from the compiler (ptxas through Triton's
own pipeline). Checked on Liger-Kernel 0.5.2's rms_norm backward, whose published H100 times jump 6× from
H = 16384 to 32768: the compiler must see it spill at BLOCK_SIZE 32768 (32 warps: 64 registers a thread)
and not at 8192 (16 warps), and it must report a failure per request rather than raise. Skips without
Liger-Kernel 0.5.2 in ``.liger-0.5.2/``.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIGER = ROOT / ".liger-0.5.2"
sys.path.insert(0, str(ROOT / "benchmarks"))

import ledger_compile  # noqa: E402

pytestmark = pytest.mark.skipif(not (LIGER / "liger_kernel").is_dir(),
                                reason="Liger-Kernel 0.5.2 not installed in .liger-0.5.2/")


def _rms_backward_request(block: int, warps: int) -> dict:
    tensor = {"tensor": "bfloat16", "aligned": True}
    fp32 = {"tensor": "float32", "aligned": True}
    stride = {"value": block}
    args = [tensor, stride, tensor, stride, tensor, stride, {"tl_dtype": "bf16"}, fp32, {"value": 1}, fp32,
            {"value": 1}, fp32, stride, {"value": 2048}, {"value": block}, {"value": 0.0}, {"value": 16},
            {"value": 0}]
    return {"module": "liger_kernel.ops.rms_norm", "name": "_rms_norm_backward_kernel", "module_file": None,
            "args": args, "kwargs": {"BLOCK_SIZE": {"value": block}, "num_warps": {"value": warps}}}


def test_the_compiler_sees_liger_rms_norm_backward_spill_at_32768(monkeypatch):
    monkeypatch.syspath_prepend(str(LIGER))
    requests = [_rms_backward_request(8192, 16), _rms_backward_request(32768, 32)]
    broken = dict(requests[0], name="no_such_kernel")
    usage = ledger_compile.resource_usage(requests + [broken], 90)
    small, large = (usage[ledger_compile.request_key(r)] for r in requests)
    assert small["spill_bytes"] == 0 and 0 < small["registers"] <= 128, small
    assert large["spill_bytes"] > 0 and large["registers"] <= 64, large
    assert large["num_warps"] == 32
    assert "error" in usage[ledger_compile.request_key(broken)]
