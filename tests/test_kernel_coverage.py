"""tests/kernel_coverage.py, the CI step that fails when a line of a @triton.jit function did not run."""
import json
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
