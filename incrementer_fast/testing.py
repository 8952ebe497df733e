"""Numerical comparison against the float64 reference: the per-dtype bounds and the error measure.

One source of truth for the repository's parity tests (``tests/``) and the shipped parity check
(``incrementer-fast check``): both compare an op's outputs and gradients with the float64 reference by the
relative-norm error ``rel_err`` and accept it up to ``REL_ERR_BOUND[dtype]`` of the inputs' dtype.
"""
from __future__ import annotations

import torch

__all__ = ["REL_ERR_BOUND", "rel_err", "assert_close_rel", "speed_up_interpreter"]

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
