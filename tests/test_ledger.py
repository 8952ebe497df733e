"""The performance ledger end to end: `benchmarks/ledger.py --size tiny` on the CPU.

Checks the schema (one row per op × case × dtype × mode × provider, every field), that forward+backward is
the sum of its parts, that the eager FLOPs are flop_counter's, that the outputs say "modelled", the
training step's peak memory, and the one-command regeneration of RESULTS.md's section. The counters
themselves are checked against hand-computed values in test_ledger_counts.py.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPS_MODES = {
    "cosine_mask": ("forward", "backward", "forward+backward"),
    "fod_loss": ("forward", "backward", "forward+backward"),
    "cds_dice_loss": ("forward", "backward", "forward+backward"),
    "seg_head_loss": ("forward", "backward", "forward+backward"),
    "pseudo_label": ("forward",),
    "loss_stage": ("forward", "backward", "forward+backward"),
    "mib_head_loss": ("forward", "backward", "forward+backward"),
}
FIELDS = ("op", "case", "dtype", "mode", "provider", "shapes", "bytes_read", "bytes_written", "min_bytes", "flops",
          "useful_flops", "lane_ops", "transcendental_ops", "launches", "max_grid", "peak_bytes", "predicted_ms")
ADDITIVE = ("bytes_read", "bytes_written", "flops", "useful_flops", "lane_ops", "transcendental_ops", "launches")


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable, "benchmarks/ledger.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("ledger")
    # The interpreter's plan: these tests check the ledger's rows and reports, not a plan
    # (test_gpu_plan_counts_what_a_gpu_would_issue does); 38 s instead of 53 s here.
    _run(["--size", "tiny", "--plan", "interpreter", "--out", str(out)])
    return out, json.loads((out / "ledger.json").read_text(encoding="utf-8"))


def test_rows_cover_every_op_dtype_mode_and_provider(tiny):
    _, ledger = tiny
    rows = ledger["rows"]
    keys = {(r["op"], r["dtype"], r["mode"], r["provider"]) for r in rows}
    expected = {(op, dtype, mode, provider) for op, modes in OPS_MODES.items() for mode in modes
                for dtype in ("fp32", "bf16") for provider in ("fused", "eager")}
    assert keys == expected
    assert len(rows) == len(expected)  # one tiny case per op
    for row in rows:
        for field in FIELDS:
            assert field in row, (field, row["op"])
        assert set(row["predicted_ms"]) >= {"h100", "h200"}
        assert all(ms > 0 for ms in row["predicted_ms"].values())
        assert row["launches"] >= 1 and row["bytes_read"] > 0 and row["min_bytes"] > 0
        assert 0 <= row["useful_flops"] <= row["flops"]
        assert row["peak_bytes"] >= 0
        assert row["shapes"] and all(isinstance(d, list) for d in row["shapes"].values())
        if row["provider"] == "fused":
            assert row["triton_launches"] >= 1 and row["max_grid"] >= 1
            assert all(k["configs"] for k in row["kernels"] if k["kind"] == "triton")  # the tiles counted
        else:
            assert row["triton_launches"] == 0 and row["max_grid"] is None


def test_forward_plus_backward_is_the_sum_of_its_parts(tiny):
    _, ledger = tiny
    index = {(r["op"], r["dtype"], r["mode"], r["provider"]): r for r in ledger["rows"]}
    for (op, dtype, mode, provider), row in index.items():
        if mode != "forward+backward":
            continue
        fwd, bwd = index[(op, dtype, "forward", provider)], index[(op, dtype, "backward", provider)]
        for field in ADDITIVE:
            assert row[field] == fwd[field] + bwd[field], (op, dtype, provider, field)
        for device, ms in row["predicted_ms"].items():
            assert ms == pytest.approx(fwd["predicted_ms"][device] + bwd["predicted_ms"][device])
        assert row["peak_bytes"] >= max(fwd["peak_bytes"], 0)


def test_eager_flops_are_the_flop_counters(tiny):
    _, ledger = tiny
    row = next(r for r in ledger["rows"] if r["op"] == "cosine_mask" and r["provider"] == "eager"
               and r["mode"] == "forward" and r["dtype"] == "fp32")
    b, n, d = row["shapes"]["patches"]
    k = row["shapes"]["classes"][1]
    assert row["flops"] == row["useful_flops"] == 2 * b * k * n * d  # one bmm
    assert row["dot_flops_by_precision"] == {"fp32_ieee": 2 * b * k * n * d}


def test_outputs_say_modelled_and_list_the_model(tiny):
    out, ledger = tiny
    text = (out / "ledger.md").read_text(encoding="utf-8")
    assert text.startswith("# Performance ledger — counted on the CPU, GPU time modelled (not measured)")
    assert "nothing is measured on a GPU" in text
    assert "caches, occupancy" in text
    for line in text.splitlines():  # "measured" only ever qualifies the workplace's H200 figures or denies
        for match in re.finditer(r"measured", line):
            before = line[max(0, match.start() - 40):match.start()]
            assert re.search(r"(not|nothing is) $", before) or "H200" in line, line
    for name in ("h100", "h200", "h200_measured"):
        assert ledger["devices"][name]["source"]
    assert _tables_are_rectangular(text) >= 3


def _tables_are_rectangular(text: str) -> int:
    """Every markdown table keeps its header's cell count on every line; returns the number of tables."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    for table in tables:
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in table}
        assert len(widths) == 1, "ragged markdown table:\n" + "\n".join(table)
    return len(tables)


def test_training_step_peak_memory(tiny):
    _, ledger = tiny
    step = ledger["step"]
    variants = {v["title"]: v for v in step["variants"]}
    assert set(variants) == {"fused ops", "reference ops"}
    for v in variants.values():
        assert v["peak_bytes"] >= v["forward_peak_bytes"] > 0
    # The reference losses materialise the full-resolution logits, the fused ones do not.
    assert variants["reference ops"]["loss_peak_bytes"] > variants["fused ops"]["loss_peak_bytes"]


def test_training_step_time_prices_every_fused_op_and_the_compiler_saw_every_launch(tiny):
    """The step's modelled time (``ledger_step.step_time``): each fused custom op of the fused step is priced
    (by a ledger row or by its own bytes), the reference step has none; the run compiled every Triton launch."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ledger_model
    import ledger_step

    _, ledger = tiny
    assert ledger["compile"]["configurations"] > 0 and ledger["compile"]["failed"] == []
    fused_rows = [r for r in ledger["rows"] if r["provider"] == "fused"]
    assert all(launch.get("registers") for r in fused_rows for launch in r["timeline"] if launch["kind"] == "triton")
    gpu = ledger_model.GPUS["h100_sxm"]
    for variant in ledger["step"]["variants"]:
        custom = [l["name"] for l in variant["timeline"] if l.get("name", "").startswith("incrementer_fast.")]
        timed = ledger_step.step_time(variant, ledger["rows"], gpu)
        assert timed["ms"] > timed["fused_ops_gpu_ms"] >= 0
        assert len(timed["priced"]) == len(custom)
        assert bool(custom) == (variant["title"] == "fused ops")


def test_gpu_plan_counts_what_a_gpu_would_issue(tmp_path):
    """--plan h100: the H100's tiles and grids, and 16-bit tl.dot operands as a GPU issues them."""
    _run(["--plan", "h100", "--case", "cosine_mask:B=1,N=64,D=32,K=5", "--dtype", "bf16", "--providers", "fused",
          "--out", str(tmp_path)])
    ledger = json.loads((tmp_path / "ledger.json").read_text(encoding="utf-8"))
    assert ledger["environment"]["plan"].startswith("h100")
    row = next(r for r in ledger["rows"] if r["mode"] == "forward")
    assert "bf16" in row["dot_flops_by_precision"]  # on a GPU bf16 tiles enter tl.dot as they are
    assert ledger["step"] is None  # custom cases: no training step


def test_compare_two_ledgers(tiny):
    out, ledger = tiny
    proc = _run(["--compare", str(out / "ledger.json"), str(out / "ledger.json")])
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(table) == len(ledger["rows"])
    assert all(line.rstrip().endswith("| 1.00 |") for line in table)  # the same ledger: no change
    assert "modelled — not measured" in proc.stdout


def test_results_section_is_regenerated_in_place(tiny, tmp_path):
    out, _ = tiny
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nmeasured things\n", encoding="utf-8")
    for _ in range(2):  # the second run replaces the section written by the first (no torch import: fast)
        _run(["--from-json", str(out / "ledger.json"), "--update-results", str(results)])
    text = results.read_text(encoding="utf-8")
    assert text.startswith("# Benchmark results\n\nmeasured things\n")
    assert text.count("<!-- ledger:begin") == 1 and text.count("<!-- ledger:end -->") == 1
    assert "## Modelled (not measured)" in text
    section = text[text.index("<!-- ledger:begin"):]
    for op in OPS_MODES:
        assert f"| {op} |" in section
    assert "peak MB (step)" in section
    assert _tables_are_rectangular(section) == 2
