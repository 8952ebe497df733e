"""cosine_mask: the public function, and the Triton path as the custom ops `incrementer_fast::cosine_mask` and
`incrementer_fast::cosine_mask_backward`.

masks[b, k, n] = scale · ⟨p̂[b, n], ĉ[b, k]⟩ with x̂ = x / max(‖x‖₂, eps). ``cosine_mask`` picks the
implementation (``incrementer_fast._dispatch.backend``) before the autograd boundary: the plain-PyTorch
reference (``incrementer_fast.reference.cosine_mask``, differentiated by autograd), or the kernels of
`incrementer_fast.kernels.cosine_mask` (which derives the VJP) behind the custom ops below. The scale enters
the ops as an optional 0-dim tensor (a learnable temperature, which gets a gradient) and a float used when
it is None (a fixed scale, such as the model's γ: no device tensor is made for it, so no fill launch per
call; the kernels receive it as two fp32 halves, exact for float64 inputs).

What the backward needs is saved by the forward: the masks themselves (the backward's row sums σ = Σ
dM·masks come from them) and the row norms ‖p‖ (B, N), ‖c‖ (B, K) — so no forward product is recomputed.
When ``out_dtype`` is less precise than the inputs' dtype (bf16 masks of fp32 inputs), masks rounded to it
would make σ less precise than the gradients it enters: the forward then also returns the masks in the
inputs' dtype, kept for the backward only (one extra (B, K, N) tensor in that case alone).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_cosine_mask_args
from .._dispatch import HAS_TRITON, backend, check_kernels_run
from ..reference.core import compute_dtype
from ..reference.core import cosine_mask as reference_cosine_mask

if HAS_TRITON:
    from ..kernels import cosine_mask as kernels

__all__ = ["cosine_mask"]

_MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def _saved_dtype(inputs_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the masks the backward reads: out_dtype, unless it is less precise than the inputs'."""
    return out_dtype if _MANTISSA_BITS[out_dtype] >= _MANTISSA_BITS[inputs_dtype] else inputs_dtype


@torch.library.custom_op("incrementer_fast::cosine_mask", mutates_args=())
def _cosine_mask_fwd_op(
    patches: torch.Tensor,
    classes: torch.Tensor,
    scale: Optional[torch.Tensor],
    scale_value: float,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks in out_dtype, masks for the backward or an empty (0,) tensor when masks serve, ‖p‖, ‖c‖)."""
    check_kernels_run(patches.device)
    saved_dtype = _saved_dtype(patches.dtype, out_dtype)
    masks, norm_p, norm_c = kernels.cosine_mask_forward(patches, classes, scale, scale_value, eps, saved_dtype)
    if saved_dtype == out_dtype:
        return masks, masks.new_empty((0,)), norm_p, norm_c
    return masks.to(out_dtype), masks, norm_p, norm_c


@_cosine_mask_fwd_op.register_fake
def _(patches, classes, scale, scale_value, eps, out_dtype):
    acc = compute_dtype(patches.dtype)
    batch, num_patches, num_classes = patches.shape[0], patches.shape[1], classes.shape[1]
    saved_dtype = _saved_dtype(patches.dtype, out_dtype)
    masks = patches.new_empty((batch, num_classes, num_patches), dtype=out_dtype)
    saved = patches.new_empty((0,) if saved_dtype == out_dtype else masks.shape, dtype=saved_dtype)
    norm_p = patches.new_empty((batch, num_patches), dtype=acc)
    norm_c = patches.new_empty((batch, num_classes), dtype=acc)
    return masks, saved, norm_p, norm_c


@torch.library.custom_op("incrementer_fast::cosine_mask_backward", mutates_args=())
def _cosine_mask_bwd_op(
    grad: torch.Tensor,
    patches: torch.Tensor,
    classes: torch.Tensor,
    scale: Optional[torch.Tensor],
    scale_value: float,
    masks: torch.Tensor,
    norm_p: torch.Tensor,
    norm_c: torch.Tensor,
    eps: float,
    need_patches: bool,
    need_classes: bool,
    need_scale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d patches, d classes, d scale): contiguous gradients in the inputs' dtype, or empty (0,) tensors
    when not needed; d scale 0-dim in the compute dtype (an empty (0,) tensor when not needed)."""
    return kernels.cosine_mask_backward(grad, patches, classes, scale, scale_value, masks, norm_p, norm_c, eps,
                                        need_patches, need_classes, need_scale)


@_cosine_mask_bwd_op.register_fake
def _(grad, patches, classes, scale, scale_value, masks, norm_p, norm_c, eps, need_patches, need_classes,
      need_scale):
    grad_patches = patches.new_empty(patches.shape if need_patches else (0,))
    grad_classes = classes.new_empty(classes.shape if need_classes else (0,))
    grad_scale = patches.new_empty(() if need_scale else (0,), dtype=compute_dtype(patches.dtype))
    return grad_patches, grad_classes, grad_scale


def _setup_context(ctx, inputs, output):
    patches, classes, scale, scale_value, eps, _ = inputs
    masks, saved, norm_p, norm_c = output
    ctx.mark_non_differentiable(saved, norm_p, norm_c)
    # The outputs other than the masks never get a gradient: no zero tensors (fill launches) for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(patches, classes, scale, saved if saved.numel() else masks, norm_p, norm_c)
    ctx.scale_value, ctx.eps = scale_value, eps


def _backward(ctx, grad, _grad_saved, _grad_norm_p, _grad_norm_c):
    patches, classes, scale, masks, norm_p, norm_c = ctx.saved_tensors
    need_patches, need_classes, need_scale = ctx.needs_input_grad[:3]
    if grad is None:
        return None, None, None, None, None, None
    grad_patches, grad_classes, grad_scale = _cosine_mask_bwd_op(
        grad, patches, classes, scale, ctx.scale_value, masks, norm_p, norm_c, ctx.eps, need_patches,
        need_classes, need_scale,
    )
    return (
        grad_patches if need_patches else None,
        grad_classes if need_classes else None,
        grad_scale.to(scale.dtype) if need_scale else None,
        None,
        None,
        None,
    )


_cosine_mask_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
        masks (B, K, N), contiguous, of dtype ``out_dtype`` (or the inputs' dtype). The backward keeps a
        reference to them (it reads them instead of recomputing the product): modifying them in place
        before ``backward`` is an error, as for any tensor autograd saved.

    Examples:
        >>> p, c = torch.randn(2, 6, 8, dtype=torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)
        >>> cosine_mask(p, c, scale=10.0, out_dtype=torch.float32).dtype
        torch.float32
    """
    check_cosine_mask_args(patches, classes, scale, eps, out_dtype)
    if backend(patches.device) == "reference":
        return reference_cosine_mask(patches, classes, scale, eps, out_dtype)
    tensor, value = (scale, 0.0) if isinstance(scale, torch.Tensor) else (None, float(scale))
    masks, _, _, _ = _cosine_mask_fwd_op(patches, classes, tensor, value, float(eps), out_dtype or patches.dtype)
    return masks
