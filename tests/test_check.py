"""`incrementer-fast check`, the parity suite shipped in the package: it runs, it reports, it catches errors.

The interpreter run is a subprocess (TRITON_INTERPRET must be set before triton is imported) in a folder
outside the repository with hypothesis and pytest blocked, so it shows the check needs neither the
repository's tests nor their dependencies.
"""
import os
import subprocess
import sys
import textwrap

import torch

import incrementer_fast.check as check
from incrementer_fast import cli


def test_quick_check_through_the_interpreter_passes_without_test_dependencies(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.modules["hypothesis"] = sys.modules["pytest"] = None  # importing either now fails
        from incrementer_fast.check import main
        sys.exit(main(["--quick", "--device", "cpu"]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "INCREMENTER_FAST_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "0 failed" in out and "FAIL" not in out
    for op in check.OPS:
        assert f"{op} on cpu" in out and f"\n{op} " in out  # the backend line and its rows
    assert "cosine_mask on cpu       triton" in out  # the kernels, through the interpreter
    for name in ("torch", "triton", "xformers", "TRITON_INTERPRET", "attention on cpu"):
        assert f"\n  {name}" in out
    assert "stride-0 grad" in out and "transposed" in out and "bfloat16" in out and "float64" in out


def test_a_wrong_op_fails_its_rows_and_the_exit_code(monkeypatch, capsys):
    real = check.cosine_mask
    monkeypatch.setattr(check, "cosine_mask", lambda *args, **kwargs: real(*args, **kwargs) * 1.05)  # 5 %: above every bound
    code = cli.main(["check", "--quick", "--ops", "cosine_mask", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1
    rows = [line for line in out.splitlines() if line.startswith("cosine_mask ")]
    assert len(rows) == 4 and all(line.split()[-1] == "FAIL" for line in rows)
    assert "4 cases, 4 failed" in out


def test_a_case_that_raises_is_a_failed_row_naming_the_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(check, "fod_loss", broken)
    row = check.run_case(check.plan("quick", ["fod_loss"])[0], torch.device("cpu"))
    assert not row.passed and row.note == "RuntimeError: kernel launch failed"


def test_bad_options_exit_2(capsys):
    assert cli.main(["check", "--ops", "cosine_mask,softmax"]) == 2
    assert "unknown op(s) softmax" in capsys.readouterr().err
    if not check._dispatch.INTERPRET:
        assert cli.main(["check", "--quick", "--backend", "triton", "--device", "cpu"]) == 2
        assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_every_level_covers_every_op_dtype_and_layout():
    for level in ("quick", "default", "thorough"):
        cases = check.plan(level)
        assert {c.op for c in cases} == set(check.OPS)
        assert {c.dtype for c in cases} >= {torch.float32, torch.float64, torch.bfloat16}
        layouts = {layout for c in cases for layout in c.layouts}
        assert {"contiguous", "transposed"} <= layouts and "stride-0" in {c.kind for c in cases}
    assert {c.dtype for c in check.plan("default")} == {torch.float32, torch.float64, torch.float16, torch.bfloat16}
    assert {"strided", "batch_expanded", "channels_last"} <= {lay for c in check.plan("default") for lay in c.layouts}
