"""Numerical comparison against the float64 reference: the per-dtype bounds and the error measure.

One source of truth for the repository's parity tests (``tests/``) and the shipped parity check
(``incrementer-fast check``): both compare an op's outputs and gradients with the float64 reference by the
relative-norm error ``rel_err`` and accept it up to ``REL_ERR_BOUND[dtype]`` of the inputs' dtype.

Also the tooling for running the kernels through Triton's interpreter (``TRITON_INTERPRET=1``):
``speed_up_interpreter`` and the kernel line probes ``record_kernel_lines`` / ``write_kernel_lines``.
"""
from __future__ import annotations

import ast

import torch

__all__ = ["REL_ERR_BOUND", "rel_err", "assert_close_rel", "speed_up_interpreter", "record_kernel_lines",
           "write_kernel_lines"]

# Per-dtype bounds on the relative-norm error ‖a − b‖ / ‖b‖ of an op (computed in fp32 internally)
# against the float64 reference. fp32: a few ulps times sqrt(reduction length); fp16/bf16: the rounding of
# the inputs and outputs (2^-11 and 2^-8) dominates.
REL_ERR_BOUND = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖a − b‖₂ / ‖b‖₂ in float64; the absolute norm when b is all zeros."""
    a = actual.detach().double().cpu()
    b = expected.detach().double().cpu()
    diff = torch.linalg.vector_norm(a - b).item()
    ref = torch.linalg.vector_norm(b).item()
    return diff / ref if ref > 0 else diff


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """AssertionError unless shapes agree, ``actual`` is finite and ``rel_err`` ≤ ``REL_ERR_BOUND[dtype]``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.detach().double()).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= REL_ERR_BOUND[dtype], f"{what}: relative-norm error {err:.3e} > {REL_ERR_BOUND[dtype]:.1e} ({dtype})"


def speed_up_interpreter() -> bool:
    """Stop Triton's interpreter from re-patching ``triton.language`` at every ``@triton.jit`` helper call made
    inside a launch; returns whether the change is in effect (idempotent).

    Under ``TRITON_INTERPRET=1`` a helper called from a kernel (``InterpretedFunction.__call__``) patches the
    ``triton.language`` modules its globals hold on *every* call, scanning every member of ``tl``,
    ``tl.core``, ``tl.math`` and ``tl.tensor`` (``inspect.getmembers``): ~0.3 ms a call, half of the suite's
    time under the GPU launch plans (many small programs, helper calls in each). Patching the same modules
    again finds them patched already (their builtins are wrapped, and those patches stay until the launch
    ends), so here a helper patches once per launch for each distinct globals dict (a kernel module's, or
    Triton's own ``standard.py`` for ``tl.sum`` and the like) and skips the repeats: the kernels compute the
    same bits (checked by the parity suite, which runs with this). A helper called outside any launch patches
    as before. Nothing changes when the interpreter's internals are not the ones this was written against
    (Triton 3.6 and 3.8): then it returns False.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    executor, function = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpretedFunction", None)
    if executor is None or function is None or not hasattr(interpreter, "_patch_lang"):
        return False
    if getattr(function, "_incrementer_fast_fast_calls", False):
        return True
    patched: list[set[int]] = []  # per launch in progress: the globals dicts whose modules are patched
    launch = executor.__call__

    def launch_with_record(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    def call(self, *args, **kwargs):
        key = id(self.fn.__globals__)
        if not patched or key not in patched[-1]:
            interpreter._patch_lang(self.fn)
            if patched:
                patched[-1].add(key)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            raise interpreter.InterpreterError(repr(error)) from error

    executor.__call__ = launch_with_record
    function.__call__ = call
    function._incrementer_fast_fast_calls = True
    return True


# The name, in a kernel module's globals, of the set that the line probes add (file, line) pairs to.
_LINE_PROBES = "__incrementer_fast_kernel_lines__"


class _LineProbes(ast.NodeTransformer):
    """Put ``<probes>.add((file, line))`` before every statement of a function's body, at every depth."""

    def __init__(self, filename: str):
        self.filename = filename

    def _probe(self, statement: ast.stmt) -> ast.stmt:
        call = ast.Call(func=ast.Attribute(value=ast.Name(id=_LINE_PROBES, ctx=ast.Load()), attr="add",
                                           ctx=ast.Load()),
                        args=[ast.Constant(value=(self.filename, statement.lineno))], keywords=[])
        return ast.copy_location(ast.Expr(value=call), statement)

    def generic_visit(self, node):
        super().generic_visit(node)
        if isinstance(node, ast.Module):  # the ``def`` itself: not a line of the kernel's body
            return node
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if isinstance(statements, list) and statements and isinstance(statements[0], ast.stmt):
                setattr(node, field, [item for statement in statements
                                      for item in (self._probe(statement), statement)])
        return node


def record_kernel_lines() -> set[tuple[str, int]] | None:
    """Record which lines of ``@triton.jit`` functions run under ``TRITON_INTERPRET=1``: returns the set that
    collects ``(file, line)`` of every statement executed from now on (None when the interpreter's internals
    are not the ones this was written against: Triton 3.6 and 3.8). Call it before any kernel runs.

    The interpreter runs a kernel as Python compiled from the kernel's own source, at its own file and line
    numbers, so coverage.py could measure it, but coverage.py's tracer sees every line of Triton's
    interpreter and of torch as well and doubles the time of the interpreter suite. Here the rewritten kernel
    source gets a probe — one ``set.add`` — before each of its statements instead, and nothing else is
    traced. ``write_kernel_lines`` stores the set as a coverage.py data file (``coverage json`` / ``report``
    / ``html`` read it; tests/kernel_coverage.py checks it); the suite checks once that the probes see the
    lines coverage.py sees (tests/test_kernel_coverage.py).
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    rewriter, function = getattr(interpreter, "FunctionRewriter", None), getattr(interpreter, "InterpretedFunction", None)
    if rewriter is None or function is None or not hasattr(rewriter, "_transform_ast"):
        return None
    existing = getattr(rewriter, "_incrementer_fast_kernel_lines", None)
    if existing is not None:
        return existing
    if function.rewritten_fn:
        raise RuntimeError("record_kernel_lines: kernels have run already (their rewritten source is cached "
                           "without probes); call it before the first launch")
    hits: set[tuple[str, int]] = set()
    transform = rewriter._transform_ast

    def transform_with_probes(self, src):
        tree = _LineProbes(self.filename).visit(transform(self, src))
        ast.fix_missing_locations(tree)
        self.fn.__globals__[_LINE_PROBES] = hits
        return tree

    rewriter._transform_ast = transform_with_probes
    rewriter._incrementer_fast_kernel_lines = hits
    return hits


def write_kernel_lines(hits: set[tuple[str, int]], path: str) -> None:
    """Store the lines ``record_kernel_lines`` collected as the coverage.py data file ``path`` (replaced)."""
    import coverage

    by_file: dict[str, list[int]] = {}
    for filename, line in sorted(hits):
        by_file.setdefault(filename, []).append(line)
    data = coverage.CoverageData(basename=path)
    data.erase()
    data.add_lines(by_file)
    data.write()
