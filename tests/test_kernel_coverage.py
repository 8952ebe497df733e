"""tests/kernel_coverage.py, the CI step that fails when a line of a @triton.jit function did not run, and the
line probes (incrementer_fast.testing.record_kernel_lines) that collect what it checks."""
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_coverage  # noqa: E402

SOURCE = '''\
import triton
import triton.language as tl


@triton.jit
def _helper(x):
    """A docstring: not a statement that runs."""
    return x + 1


@triton.jit(do_not_specialize=["n"])
def _kernel(ptr, n, FLAG: tl.constexpr):
    value = tl.load(ptr)
    if FLAG:
        value = _helper(value)
    else:
        value = value * 2  # not on the CPU: an example reason
    tl.store(ptr, value)


def host(x):
    return x
'''


def _report(path: Path, missing: list[int]) -> dict:
    return {"files": {str(path): {"missing_lines": missing, "executed_lines": []}}}


def test_jit_functions_are_found_with_their_bodies():
    functions = kernel_coverage.jit_functions(SOURCE)
    assert [name for name, _, _ in functions] == ["_helper", "_kernel"]
    assert functions[0][1:] == (8, 8)  # the body after the docstring
    assert functions[1][1:] == (13, 18)


def test_unrun_lines_fail_and_excluded_lines_need_a_reason(tmp_path, capsys):
    kernel = tmp_path / "kernel.py"
    kernel.write_text(SOURCE)
    report = tmp_path / "coverage.json"
    # 15: a branch that did not run; 17: excluded with its reason; 22: host code, not checked.
    report.write_text(json.dumps(_report(kernel, [15, 17, 22])))
    assert kernel_coverage.main([str(report), str(kernel)]) == 1
    out = capsys.readouterr().out
    assert f"NOT RUN {kernel}:15 (_kernel): value = _helper(value)" in out
    assert "17" not in out.split("NOT RUN")[1] and "excluded" in out and "an example reason" in out
    assert ":22" not in out
    report.write_text(json.dumps(_report(kernel, [17, 22])))
    assert kernel_coverage.main([str(report), str(kernel)]) == 0
    assert "all ran, 1 excluded" in capsys.readouterr().out


def test_a_kernel_file_missing_from_the_report_is_an_error(tmp_path, capsys):
    kernel = tmp_path / "kernel.py"
    kernel.write_text(SOURCE)
    report = tmp_path / "coverage.json"
    report.write_text(json.dumps({"files": {}}))
    assert kernel_coverage.main([str(report), str(kernel)]) == 2
    assert "is not in the report" in capsys.readouterr().out


# Run in subprocesses (TRITON_INTERPRET=1 must be set before triton is imported): once traced by coverage.py,
# once with the probes recording (a run traced by coverage.py with the probes in place is no evidence: the
# probes' own bytecode gives it line events of its own). Both must see the same kernel lines, and
# kernel_coverage must read the probes' file.
KERNEL_RUN = """
import sys
import torch
from incrementer_fast.testing import record_kernel_lines, write_kernel_lines
hits = record_kernel_lines() if sys.argv[1:] == ["--probes"] else None
import kernel
x = torch.full((1,), 3.0)
kernel._kernel[(1,)](x, 1, FLAG=True)
assert x.item() == 4.0, x
if hits is not None:
    write_kernel_lines(hits, "probes.coverage")
"""


def test_the_line_probes_see_the_lines_coverage_py_sees(tmp_path, monkeypatch):
    (tmp_path / "kernel.py").write_text(SOURCE)
    (tmp_path / "kernel_run.py").write_text(KERNEL_RUN)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    for command in (["-m", "coverage", "run", "--data-file=traced.coverage", f"--include={tmp_path}/kernel.py",
                     "kernel_run.py"], ["kernel_run.py", "--probes"]):
        run = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    lines = {}
    for name in ("traced", "probes"):
        subprocess.run([sys.executable, "-m", "coverage", "json", f"--data-file={name}.coverage", "-o",
                        f"{name}.json", "-q"], cwd=tmp_path, check=True, timeout=120)
        report = json.loads((tmp_path / f"{name}.json").read_text())
        (entry,) = report["files"].values()
        lines[name] = {line for line in entry["executed_lines"]
                       if any(first <= line <= last for _, first, last in kernel_coverage.jit_functions(SOURCE))}
    assert lines["probes"] == lines["traced"] == {8, 13, 14, 15, 18}
    # The branch not taken (17) is excluded with its reason, so the probes' report passes the check. (coverage
    # json names files relative to where it ran.)
    monkeypatch.chdir(tmp_path)
    assert kernel_coverage.main(["probes.json", "kernel.py"]) == 0
