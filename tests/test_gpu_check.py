"""benchmarks/gpu_check.sh in its CPU dry-run mode: every stage skipped for lack of a CUDA device, and still
the eight files the device tool brings back, so that a GPU run's structure is checked before a GPU is lent."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {"summary.md", "env.log", "bench.log", "results.json", "results.md", "attention.log", "tests.log",
         "junit.xml"}


def test_dry_run_writes_every_file(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OUT": str(out), "DRY_RUN": "1",
                                            "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 files: the device tool's limit
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "Dry run" in summary
    for stage in ("setup", "bench", "step", "attention", "tests"):
        assert f"| {stage} | — | 0 | skipped: no CUDA device (dry run) |" in summary, stage
    env = (out / "env.log").read_text(encoding="utf-8")
    assert "torch" in env and "incrementer_fast" in env  # the environment report runs in a dry run too
    assert "not_run" in (out / "results.json").read_text(encoding="utf-8")
