"""fod_loss: the public function, and the Triton path as the custom ops `incrementer_fast::fod_loss` and
`incrementer_fast::fod_loss_backward`.

``fod_loss`` picks the implementation (``incrementer_fast._dispatch.backend``) before the autograd boundary:
the plain-PyTorch reference (``incrementer_fast.reference.fod_loss``, differentiated by autograd) or the
kernels of `incrementer_fast.kernels.fod_loss`. The forward op returns (loss, W = Σ max(w, 0)); W is kept
for the backward op.
"""
from __future__ import annotations

import torch

from .._checks import check_fod_loss_args
from .._dispatch import HAS_TRITON, backend, check_kernels_run
from ..reference import core as reference

if HAS_TRITON:
    from ..kernels import fod_loss as kernels

__all__ = ["fod_loss"]


@torch.library.custom_op("incrementer_fast::fod_loss", mutates_args=())
def _fod_loss_fwd_op(
    student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check_kernels_run(student.device)
    return kernels.fod_loss_forward(student, teacher, weight, eps)


@_fod_loss_fwd_op.register_fake
def _(student, teacher, weight, eps):
    acc = reference.compute_dtype(student.dtype)
    return student.new_empty((), dtype=acc), student.new_empty((), dtype=acc)


@torch.library.custom_op("incrementer_fast::fod_loss_backward", mutates_args=())
def _fod_loss_bwd_op(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    weight_sum: torch.Tensor,
    eps: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂loss/∂student, ∂loss/∂teacher), contiguous; an unrequested one is an empty tensor."""
    return kernels.fod_loss_backward(grad_loss, student, teacher, weight, weight_sum, eps, student_grad, teacher_grad)


@_fod_loss_bwd_op.register_fake
def _(grad_loss, student, teacher, weight, weight_sum, eps, student_grad, teacher_grad):
    contiguous = torch.contiguous_format
    grad_student = torch.empty_like(student, memory_format=contiguous) if student_grad else student.new_empty((0,))
    grad_teacher = torch.empty_like(teacher, memory_format=contiguous) if teacher_grad else teacher.new_empty((0,))
    return grad_student, grad_teacher


def _setup_context(ctx, inputs, output):
    student, teacher, weight, eps = inputs
    _, weight_sum = output
    ctx.mark_non_differentiable(weight_sum)
    ctx.set_materialize_grads(False)  # W never gets a gradient: no zero tensor (a fill launch) for it
    ctx.save_for_backward(student, teacher, weight, weight_sum)
    ctx.eps = eps


def _backward(ctx, grad_loss, _grad_weight_sum):
    student, teacher, weight, weight_sum = ctx.saved_tensors
    student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None:
        return None, None, None, None
    grad_student, grad_teacher = _fod_loss_bwd_op(
        grad_loss, student, teacher, weight, weight_sum, ctx.eps, student_grad, teacher_grad
    )
    # The weight is a fixed per-vector coefficient: it gets no gradient, whether or not it requires one.
    return (grad_student if student_grad else None), (grad_teacher if teacher_grad else None), None, None


_fod_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fod_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """FOD's cosine distillation loss: the weighted mean of 1 − cos over paired vectors.

    loss = Σ_i w_i·(1 − ⟨ŝ_i, t̂_i⟩) / Σ_i w_i with x̂ = x / max(‖x‖₂, eps), over the vectors i of
    student/teacher (..., D).

    Args:
        student: (..., D) float tensor; gets a gradient, in its dtype.
        teacher: (..., D), the shape of student; gets a gradient when it requires one.
        weight: (...) one weight per vector; gets no gradient. Negative weights count as 0 (clamped on the
            device, both on the kernel and the reference path; see `incrementer_fast.reference.fod_loss`); a
            NaN weight gives a NaN loss on both.
        eps: the norm clamp, > 0.

    Returns:
        0-dim float32 tensor (float64 for float64 student); exactly 0, with zero gradients, when
        Σ max(w, 0) = 0 (all weights ≤ 0, or no vectors at all, e.g. a batch of 0).

    Examples:
        >>> s, t = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
        >>> fod_loss(s, t, torch.ones(2, 16)).shape
        torch.Size([])
    """
    check_fod_loss_args(student, teacher, weight, eps)
    if backend(student.device) == "reference":
        return reference.fod_loss(student, teacher, weight, eps)
    loss, _ = _fod_loss_fwd_op(student, teacher, weight, float(eps))
    return loss
