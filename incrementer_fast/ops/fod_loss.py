"""`incrementer_fast::fod_loss`: the FOD cosine distillation loss as a torch custom op with autograd.

Forward op returns (loss, W = Σ max(w, 0)); the public `fod_loss` returns the loss and W is kept for the backward,
itself the custom op `incrementer_fast::fod_loss_backward`. Tensors on a Triton backend (CUDA, or the CPU
under TRITON_INTERPRET=1) run the kernels of `incrementer_fast.kernels.fod_loss`; other CPU tensors run
the reference forward and the same VJP formula written in PyTorch.
"""
from __future__ import annotations

import torch

from .._checks import check_fod_loss_args
from .._dispatch import HAS_TRITON, backend
from ..reference import core as reference

if HAS_TRITON:
    from ..kernels import fod_loss as kernels

__all__ = ["fod_loss"]


@torch.library.custom_op("incrementer_fast::fod_loss", mutates_args=())
def _fod_loss(
    student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend(student.device) == "triton":
        return kernels.fod_loss_forward(student, teacher, weight, eps)
    acc = reference.compute_dtype(student.dtype)
    return reference.fod_loss(student, teacher, weight, eps), weight.to(acc).clamp_min(0.0).sum()


@_fod_loss.register_fake
def _(student, teacher, weight, eps):
    acc = reference.compute_dtype(student.dtype)
    return student.new_empty((), dtype=acc), student.new_empty((), dtype=acc)


@torch.library.custom_op("incrementer_fast::fod_loss_backward", mutates_args=())
def _fod_loss_backward(
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
    if backend(student.device) == "triton":
        return kernels.fod_loss_backward(
            grad_loss, student, teacher, weight, weight_sum, eps, student_grad, teacher_grad
        )
    return _reference_backward(grad_loss, student, teacher, weight, weight_sum, eps, student_grad, teacher_grad)


def _reference_backward(grad_loss, student, teacher, weight, weight_sum, eps, student_grad, teacher_grad):
    """The VJP of the reference in PyTorch, the same formula as the kernels (derived in kernels/fod_loss.py).

    A custom op's implementation runs below autograd, so it cannot differentiate the reference itself.
    """
    acc = reference.compute_dtype(student.dtype)
    s = student.to(acc)
    t = teacher.to(acc)
    norm_s = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    norm_t = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    a = norm_s.clamp_min(eps)
    b = norm_t.clamp_min(eps)
    cos = (s * t).sum(-1, keepdim=True) / a / b
    nonzero = weight_sum != 0
    c = torch.where(nonzero, grad_loss.to(acc) / torch.where(nonzero, weight_sum, 1.0), 0.0)
    c = c * weight.to(acc).clamp_min(0.0).unsqueeze(-1)
    cross = -c / a / b
    if student_grad:
        grad_student = (cross * t + torch.where(norm_s >= eps, c * cos / a / a, 0.0) * s).to(student.dtype)
    else:
        grad_student = student.new_empty((0,))
    if teacher_grad:
        grad_teacher = (cross * s + torch.where(norm_t >= eps, c * cos / b / b, 0.0) * t).to(teacher.dtype)
    else:
        grad_teacher = teacher.new_empty((0,))
    return grad_student.contiguous(), grad_teacher.contiguous()


@_fod_loss_backward.register_fake
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
    grad_student, grad_teacher = torch.ops.incrementer_fast.fod_loss_backward(
        grad_loss, student, teacher, weight, weight_sum, ctx.eps, student_grad, teacher_grad
    )
    # The weight is a fixed per-vector coefficient: it gets no gradient, whether or not it requires one.
    return (grad_student if student_grad else None), (grad_teacher if teacher_grad else None), None, None


_fod_loss.register_autograd(_backward, setup_context=_setup_context)


def fod_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """FOD's cosine distillation loss: the weighted mean of 1 − cos over paired vectors.

    loss = Σ_i w_i·(1 − ⟨ŝ_i, t̂_i⟩) / Σ_i w_i with x̂ = x / max(‖x‖₂, eps), over the vectors i of
    student/teacher (..., D).

    Args:
        student: (..., D) float tensor; gets a gradient, in its dtype.
        teacher: (..., D), the shape of student; gets a gradient when it requires one.
        weight: (...) one weight per vector; gets no gradient. Negative weights count as 0 (clamped on the
            device, both on the kernel and the reference path; see `incrementer_fast.reference.fod_loss`).
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
    loss, _ = torch.ops.incrementer_fast.fod_loss(student, teacher, weight, float(eps))
    return loss
