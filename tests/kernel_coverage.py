"""Fail when a line of a ``@triton.jit`` function did not run in the interpreter suite.

Under ``TRITON_INTERPRET=1`` Triton runs a kernel's body as Python, compiled from its own file at its own line
numbers, so coverage.py sees which kernel lines executed. This script reads coverage.py's JSON report of such
a run (``coverage json``) and lists, for every ``@triton.jit`` function of the kernel files, the statements
of its body that never ran. A line that cannot run on the CPU is excluded only by a comment on that line,
``# not on the CPU: <reason>``, with the reason written out.

Usage (tests/run.sh runs it after the H100-plan pass)::

    python tests/kernel_coverage.py coverage.json kernels/*.py

Exit status 0 when every body line ran (or is excluded with a reason), 1 otherwise (the lines are printed),
2 for a report that does not cover a kernel file at all.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys

EXCLUDE = re.compile(r"#\s*not on the CPU:\s*(\S.*)$")


def _is_jit(decorator: ast.expr) -> bool:
    """``@triton.jit``, ``@triton.jit(...)`` or ``@jit``."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return name == "jit"


def jit_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, first body line, last line) of every @triton.jit function in ``source``; the body starts after
    the docstring."""
    functions = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]  # the docstring
            if body:
                functions.append((node.name, body[0].lineno, node.end_lineno))
    return functions


def _report_entry(report: dict, path: str) -> dict | None:
    wanted = os.path.realpath(path)
    for measured, entry in report["files"].items():
        if os.path.realpath(measured) == wanted:
            return entry
    return None


def unexecuted(report: dict, path: str) -> list[tuple[str, int, str]] | None:
    """(function, line, text) of each body line of a jit function in ``path`` that did not run and is not
    excluded; None when the report has no entry for ``path``."""
    entry = _report_entry(report, path)
    if entry is None:
        return None
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    lines = source.splitlines()
    missing = set(entry["missing_lines"])
    result = []
    for name, first, last in jit_functions(source):
        for line in sorted(missing):
            if first <= line <= last and not EXCLUDE.search(lines[line - 1]):
                result.append((name, line, lines[line - 1].strip()))
    return result


def excluded(path: str) -> list[tuple[int, str]]:
    """(line, reason) of every excluded line inside a jit function of ``path``."""
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    lines = source.splitlines()
    found = []
    for _, first, last in jit_functions(source):
        for line in range(first, last + 1):
            match = EXCLUDE.search(lines[line - 1])
            if match:
                found.append((line, match.group(1)))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="coverage.py's JSON report (coverage json -o FILE)")
    parser.add_argument("kernels", nargs="+", help="the kernel source files")
    args = parser.parse_args(argv)
    with open(args.report, encoding="utf-8") as handle:
        report = json.load(handle)
    failed = False
    for path in args.kernels:
        source = open(path, encoding="utf-8").read()
        functions = jit_functions(source)
        if not functions:
            continue
        lines = unexecuted(report, path)
        if lines is None:
            print(f"kernel coverage: {path} is not in the report {args.report}: did none of its kernels run?")
            return 2
        body_lines = sum(last - first + 1 for _, first, last in functions)
        skipped = excluded(path)
        status = "all ran" if not lines else f"{len(lines)} did not run"
        print(f"kernel coverage: {path}: {len(functions)} @triton.jit functions, {body_lines} body lines, "
              f"{status}, {len(skipped)} excluded")
        for line, reason in skipped:
            print(f"    excluded {path}:{line}: {reason}")
        for name, line, text in lines:
            print(f"    NOT RUN {path}:{line} ({name}): {text}")
        failed = failed or bool(lines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
