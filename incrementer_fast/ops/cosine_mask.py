"""cosine_mask as the custom ops `incrementer_fast::cosine_mask` and `incrementer_fast::cosine_mask_backward`.

masks[b, k, n] = scale · ⟨p̂[b, n], ĉ[b, k]⟩ with x̂ = x / max(‖x‖₂, eps): the Triton kernels of
`incrementer_fast.kernels.cosine_mask` (which derives the VJP) for tensors whose backend is "triton", the
plain-PyTorch reference otherwise. The scale always enters the ops as a 0-dim tensor, so one schema serves a
Python float and a learnable temperature, and a float64 scale keeps full precision inside the kernels.
"""
from __future__ import annotations

import torch

from .._checks import check_cosine_mask_args
from .._dispatch import HAS_TRITON, backend
from ..reference import cosine_mask as reference_cosine_mask
from ..reference.core import compute_dtype

if HAS_TRITON:
    from ..kernels import cosine_mask as kernels

__all__ = ["cosine_mask"]


@torch.library.custom_op("incrementer_fast::cosine_mask", mutates_args=())
def _cosine_mask_op(
    patches: torch.Tensor, classes: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    if backend(patches.device) == "triton":
        return kernels.cosine_mask_forward(patches, classes, scale, eps, out_dtype)
    return reference_cosine_mask(patches, classes, scale, eps, out_dtype)


@_cosine_mask_op.register_fake
def _(patches, classes, scale, eps, out_dtype):
    return patches.new_empty((patches.shape[0], classes.shape[1], patches.shape[1]), dtype=out_dtype)


@torch.library.custom_op("incrementer_fast::cosine_mask_backward", mutates_args=())
def _cosine_mask_backward_op(
    grad: torch.Tensor,
    patches: torch.Tensor,
    classes: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    need_patches: bool,
    need_classes: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d patches, d classes, d scale): contiguous gradients in the inputs' dtype, or empty (0,) tensors
    when not needed; d scale 0-dim in the compute dtype."""
    if backend(patches.device) == "triton":
        return kernels.cosine_mask_backward(grad, patches, classes, scale, eps, need_patches, need_classes)
    with torch.autocast(patches.device.type, enabled=False):  # a backward inside autocast: keep fp32 bmm
        return _reference_backward(grad, patches, classes, scale, eps, need_patches, need_classes)


def _reference_backward(grad, patches, classes, scale, eps, need_patches, need_classes):
    """The VJP derived in `incrementer_fast.kernels.cosine_mask`, in plain PyTorch (compute dtype).

    raw = ĉ p̂ᵀ, σ_p = Σ_k dM·raw, σ_c = Σ_n dM·raw, ds = Σ σ_c, and for x ∈ {p, c} with its partner y:
    dx = s · (Σ dM ŷ − x̂ σ_x [‖x‖ ≥ eps]) / max(‖x‖, eps).
    """
    acc = compute_dtype(patches.dtype)
    p, c, g, s = patches.to(acc), classes.to(acc), grad.to(acc), scale.to(acc)
    norm_p = torch.linalg.vector_norm(p, dim=-1, keepdim=True)
    norm_c = torch.linalg.vector_norm(c, dim=-1, keepdim=True)
    inv_p = 1.0 / norm_p.clamp_min(eps)
    inv_c = 1.0 / norm_c.clamp_min(eps)
    p_hat, c_hat = p * inv_p, c * inv_c
    grad_raw = g * torch.bmm(c_hat, p_hat.transpose(1, 2))
    sigma_p = grad_raw.sum(1).unsqueeze(-1)
    sigma_c = grad_raw.sum(2).unsqueeze(-1)
    grad_patches = patches.new_empty(0)
    if need_patches:
        tangent = torch.bmm(g.transpose(1, 2), c_hat) - p_hat * torch.where(norm_p >= eps, sigma_p, 0.0)
        grad_patches = (s * tangent * inv_p).to(patches.dtype).contiguous()
    grad_classes = classes.new_empty(0)
    if need_classes:
        tangent = torch.bmm(g, p_hat) - c_hat * torch.where(norm_c >= eps, sigma_c, 0.0)
        grad_classes = (s * tangent * inv_c).to(classes.dtype).contiguous()
    return grad_patches, grad_classes, sigma_c.sum()


@_cosine_mask_backward_op.register_fake
def _(grad, patches, classes, scale, eps, need_patches, need_classes):
    grad_patches = patches.new_empty(patches.shape if need_patches else (0,))
    grad_classes = classes.new_empty(classes.shape if need_classes else (0,))
    return grad_patches, grad_classes, patches.new_empty((), dtype=compute_dtype(patches.dtype))


def _setup_context(ctx, inputs, output):
    patches, classes, scale, eps, _ = inputs
    ctx.save_for_backward(patches, classes, scale)
    ctx.eps = eps


def _backward(ctx, grad):
    patches, classes, scale = ctx.saved_tensors
    need_patches, need_classes, need_scale = ctx.needs_input_grad[:3]
    grad_patches, grad_classes, grad_scale = _cosine_mask_backward_op(
        grad, patches, classes, scale, ctx.eps, need_patches, need_classes
    )
    return (
        grad_patches if need_patches else None,
        grad_classes if need_classes else None,
        grad_scale.to(scale.dtype) if need_scale else None,
        None,
        None,
    )


_cosine_mask_op.register_autograd(_backward, setup_context=_setup_context)


def cosine_mask(
    patches: torch.Tensor,
    classes: torch.Tensor,
    scale=1.0,
    eps: float = 1e-8,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cosine-similarity masks of the mask-transformer decoder, times a scale.

    masks[b, k, n] = scale · ⟨p̂[b, n], ĉ[b, k]⟩ with x̂ = x / max(‖x‖₂, eps), computed in float32 (float64
    for float64 inputs) and rounded once to ``out_dtype``.

    Args:
        patches: (B, N, D) patch embeddings, any float dtype, any strides.
        classes: (B, K, D) class embeddings, the dtype of ``patches``.
        scale: a Python float or a 0-dim float tensor; a tensor that requires grad gets its gradient (a
            learnable temperature).
        eps: the norm clamp, > 0.
        out_dtype: the masks' dtype; None (default) keeps the inputs' dtype. ``torch.float32`` from
            bfloat16 inputs keeps logits near ±scale at fp32 resolution instead of bf16's 2^-4 steps near
            ±10 (the model asks for it under autocast). The gradients reach patches and classes in their
            own dtype whatever ``out_dtype`` is.

    Returns:
        masks (B, K, N), contiguous, of dtype ``out_dtype`` (or the inputs' dtype).

    Examples:
        >>> p, c = torch.randn(2, 6, 8, dtype=torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)
        >>> cosine_mask(p, c, scale=10.0, out_dtype=torch.float32).dtype
        torch.float32
    """
    check_cosine_mask_args(patches, classes, scale, eps, out_dtype)
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((), float(scale), dtype=compute_dtype(patches.dtype), device=patches.device)
    return _cosine_mask_op(patches, classes, scale, float(eps), out_dtype or patches.dtype)
