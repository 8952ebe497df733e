"""benchmarks/calibrate.py on a few rows of Liger-Kernel's published H100 NVL benchmark file.

Checks calibration.json's structure (one object per input row, the row's columns, ``predicted``,
``supported``), that an unknown ``gpu_name`` is an error naming it before anything is written, and the
assumption the rebuild rests on: a workload's counts are linear in its rows dimension (counted at 2 and 4
rows and extrapolated to 8, they equal the counts at 8). Skips without the shared data file or without
Liger-Kernel 0.5.2 in ``.liger-0.5.2/`` (see benchmarks/README.md).
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gpu_measurements" / "liger_0.5.2_h100_nvl.csv"
LIGER = ROOT / ".liger-0.5.2" / "liger_kernel"

pytestmark = [
    pytest.mark.skipif(not DATA.is_file(), reason=f"third-party measurements absent ({DATA})"),
    pytest.mark.skipif(not LIGER.is_dir(), reason="Liger-Kernel 0.5.2 not installed in .liger-0.5.2/"),
]


def _rows(select):
    with DATA.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, [row for row in reader if select(row)]


def _write(path, fieldnames, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def _calibrate(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_calibration_json_has_one_record_per_row(tmp_path):
    fieldnames, rows = _rows(lambda r: r["kernel_name"] == "cross_entropy" and r["x_value"] == "4096")
    assert {r["kernel_provider"] for r in rows} == {"liger", "huggingface", "torchcompile"}
    _write(tmp_path / "rows.csv", fieldnames, rows)
    done = _calibrate("--measurements", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "out" / "calibration.json").read_text(encoding="utf-8"))
    assert len(records) == len(rows)
    for record, row in zip(records, rows):
        assert {k: record[k] for k in fieldnames} == row
        assert record["supported"] is True and record["predicted"] > 0
    memory = {r["kernel_provider"]: r for r in records if r["metric_name"] == "memory"}
    # the logits alone are 16384 × 4096 fp32 = 256 MiB; Liger writes their gradient in place
    assert memory["liger"]["predicted"] == pytest.approx(float(memory["liger"]["y_value_50"]), rel=0.05)
    assert "speedup" in done.stdout and "modelled" in done.stdout


def test_unknown_gpu_name_is_an_error_naming_it(tmp_path):
    fieldnames, rows = _rows(lambda r: r["kernel_name"] == "rms_norm")
    rows = [dict(rows[0], gpu_name="NVIDIA Imaginary X1")]
    _write(tmp_path / "rows.csv", fieldnames, rows)
    done = _calibrate("--measurements", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "out"))
    assert done.returncode != 0
    assert "NVIDIA Imaginary X1" in done.stderr and "GPU_NAMES" in done.stderr
    assert not (tmp_path / "out").exists()


def test_counts_extrapolate_linearly_and_the_fusion_model_rules():
    """Counted at 2 and 4 rows and extrapolated to 8, the counts equal those at 8. In the same process (one
    start-up): extrapolation takes the busiest load site at the target size (a weight loaded once per
    program dominates a few rows, the rows dominate many); the fusion model keeps AccumulateGrad's update
    out of the compiled graph and recomputes a large forward intermediate that only the backward reads."""
    code = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, "benchmarks")
import calibrate as C, calibrate_workloads as W
liger = W.load_liger("0.5.2", 132)
for provider in ("liger", "huggingface"):
    row = W.Row("rms_norm", provider, "H", 256, {"M": 2048, "dtype": "torch.bfloat16", "eps": 1e-6})
    counts = {s: C.count_workload(row, s, "memory" if provider == "liger" else "full", liger)[provider] for s in (2, 4, 8)}
    predicted = C.extrapolate(counts[2], counts[4], 2, 4, 8)
    for got, want in zip(predicted["launches"], counts[8]["launches"]):
        assert got["name"] == want["name"], (got["name"], want["name"])
        for key in ("bytes_read", "bytes_written", "transcendental_ops", "load_calls", "load_rounds"):
            assert abs(got[key] - want[key]) < 1e-6, (provider, got["name"], key, got[key], want[key])
    assert len(predicted["launches"]) == len(counts[8]["launches"])
    assert abs(predicted["peak_bytes"] - counts[8]["peak_bytes"]) <= 512 * 8, (predicted["peak_bytes"], counts[8]["peak_bytes"])
from ledger_count import Launch

def launch(sites):
    return {"name": "k", "kind": "triton", "phase": "backward", "bytes_read": 0, "bytes_written": 0,
            "transcendental_ops": 0, "grid": 132, "load_calls": sum(sites.values()), "load_sites": sites,
            "dot_flops": {}, "lane_ops": {}, "tensor_traffic": []}
at2 = {"launches": [launch({"w": 132, "row": 2})], "peak_bytes": 0}
at4 = {"launches": [launch({"w": 132, "row": 4})], "peak_bytes": 0}
assert C.extrapolate(at2, at4, 2, 4, 2048)["launches"][0]["load_rounds"] == 2048

def aten(name, phase, reads, writes):
    l = Launch("aten", "aten." + name + ".default", phase)
    l.storages_read, l.storages_written = dict(reads), dict(writes)
    l.bytes_read, l.bytes_written = sum(reads.values()), sum(writes.values())
    return l

MB = 2**20
x, h, y, stat, dy, dx, grad = "x", "h", "y", "stat", "dy", "dx", "grad"
launches = [aten("mul", "forward", {x: MB}, {h: MB}),            # h: only the backward reads it
            aten("sum", "forward", {h: MB}, {stat: 64}),          # stat: small, saved
            aten("mul", "forward", {h: MB, stat: 64}, {y: MB}),   # y: the output
            aten("mul", "backward", {dy: MB, h: MB, stat: 64}, {dx: MB}),
            aten("add_", "backward", {grad: MB, dx: MB}, {grad: MB})]  # x.grad += dx
fused = C.fuse(launches, alive_after={y, grad, h, stat}, outputs={y}, preexisting={x, grad, dy})["launches"]
forward, backward, accumulate = fused
assert forward["bytes_written"] == MB + 64, forward  # y and stat, not h
assert backward["bytes_read"] == 2 * MB + 64, backward  # dy, x (recomputing h) and stat
assert accumulate.name == "aten.add_.default"  # its own kernel, outside the graph
print("linear")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "linear" in done.stdout, done.stderr[-3000:]

