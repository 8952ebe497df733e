"""Numerical comparison against the float64 reference: the per-dtype bounds and the error measure.

One source of truth for the repository's parity tests (``tests/``) and the shipped parity check
(``incrementer-fast check``): both compare an op's outputs and gradients with the float64 reference by the
relative-norm error ``rel_err`` and accept it up to ``REL_ERR_BOUND[dtype]`` of the inputs' dtype.
"""
from __future__ import annotations

import torch

__all__ = ["REL_ERR_BOUND", "rel_err", "assert_close_rel"]

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
