"""MiB's unbiased cross-entropy and unbiased distillation from patch-resolution masks, as a custom op.

Public function (definition in ``incrementer_fast/reference/mib_head.py``, the spec):

* ``mib_head_loss(masks, labels, num_old, teacher_masks=None, kd_alpha=1.0, ignore_index=255) -> (unce,
  unkd)``: masks (B, K, h, w) and teacher_masks (B, num_old, h, w) patch-resolution logits (any float
  dtype, any strides), labels (B, H, W) any integer dtype; MiB's ``UnbiasedCrossEntropy`` and
  ``UnbiasedKnowledgeDistillationLoss`` (reduction mean) of their bilinear (align_corners=False)
  upsampling to (H, W), never materialised.

Structure of the kernel path: ``incrementer_fast::mib_head_loss_sums`` maps (masks, labels, teacher_masks)
to three per-image sums (B, 3) — Σ CE over the counted pixels, their count, Σ of the per-pixel
distillation term (see ``kernels/mib_head_loss.py``) — plus per-pixel statistics (B, 2 or 5, H, W) saved for
the backward. The two means are two (B,)-sized torch ops on those sums, so autograd differentiates them and
``incrementer_fast::mib_head_loss_sums_backward`` receives the gradient of the sums and writes the gradient
of masks directly. Memory: 2 (5 with a teacher) values per pixel and the (B, K, h, w) gradient; no
(B, K, H, W) tensor in forward or backward.

Dispatch: the public function picks the implementation (``incrementer_fast._dispatch.backend``) before the
autograd boundary, as every op of the package.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._dispatch import HAS_TRITON, backend, check_kernels_run
from .._checks import check_mib_head_loss_args
from ..reference import mib_head as reference
from ..reference.core import compute_dtype

if HAS_TRITON:
    from ..kernels import mib_head_loss as kernels

__all__ = ["mib_head_loss"]


def _num_stats(teacher_masks: Optional[torch.Tensor]) -> int:
    return kernels.STATS_WITHOUT_TEACHER if teacher_masks is None else kernels.STATS_WITH_TEACHER


@torch.library.custom_op("incrementer_fast::mib_head_loss_sums", mutates_args=())
def _mib_head_loss_fwd_op(
    masks: torch.Tensor, labels: torch.Tensor, teacher_masks: Optional[torch.Tensor], num_old: int,
    kd_alpha: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-image sums (B, 3), per-pixel stats (B, 2 or 5, H, W)), see kernels/mib_head_loss.py."""
    check_kernels_run(masks.device)
    return kernels.mib_head_loss_forward(masks, labels, teacher_masks, num_old, kd_alpha, ignore_index)


@_mib_head_loss_fwd_op.register_fake
def _(masks, labels, teacher_masks, num_old, kd_alpha, ignore_index):
    acc = compute_dtype(masks.dtype)
    batch, height, width = labels.shape
    return (
        masks.new_empty((batch, kernels.NUM_SUMS), dtype=acc),
        masks.new_empty((batch, _num_stats(teacher_masks), height, width), dtype=acc),
    )


@torch.library.custom_op("incrementer_fast::mib_head_loss_sums_backward", mutates_args=())
def _mib_head_loss_bwd_op(
    grad_sums: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, teacher_masks: Optional[torch.Tensor],
    pixel_stats: torch.Tensor, num_old: int, kd_alpha: float, ignore_index: int,
) -> torch.Tensor:
    """Gradient of masks (B, K, h, w) from the gradient of the sums (B, 3)."""
    return kernels.mib_head_loss_backward(grad_sums, masks, labels, teacher_masks, pixel_stats, num_old, kd_alpha,
                                          ignore_index)


@_mib_head_loss_bwd_op.register_fake
def _(grad_sums, masks, labels, teacher_masks, pixel_stats, num_old, kd_alpha, ignore_index):
    return torch.empty(masks.shape, dtype=masks.dtype, device=masks.device)


def _setup_context(ctx, inputs, output):
    masks, labels, teacher_masks, num_old, kd_alpha, ignore_index = inputs
    _, pixel_stats = output
    ctx.save_for_backward(masks, labels, teacher_masks, pixel_stats)
    ctx.num_old, ctx.kd_alpha, ctx.ignore_index = num_old, kd_alpha, ignore_index


def _backward(ctx, grad_sums, grad_pixel_stats):
    # pixel_stats is an internal output: nothing differentiates it. The teacher is not differentiated.
    masks, labels, teacher_masks, pixel_stats = ctx.saved_tensors
    if grad_sums is None:
        return None, None, None, None, None, None
    grad_masks = _mib_head_loss_bwd_op(grad_sums, masks, labels, teacher_masks, pixel_stats, ctx.num_old,
                                       ctx.kd_alpha, ctx.ignore_index)
    return grad_masks, None, None, None, None, None


_mib_head_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def mib_head_loss(
    masks: torch.Tensor,
    labels: torch.Tensor,
    num_old: int,
    teacher_masks: Optional[torch.Tensor] = None,
    kd_alpha: float = 1.0,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unce, unkd): MiB's unbiased cross-entropy and unbiased distillation of patch-resolution masks
    (B, K, h, w) against labels (B, H, W), never materialising the (B, K, H, W) pixel logits.

    Args:
        masks: (B, K, h, w) student logits at patch resolution, any float dtype and strides; differentiable.
        labels: (B, H, W) integer labels of the step: background 0, new classes in [num_old, K); a label
            in [1, num_old) counts as background (MiB's ``labels[targets < old_cl] = 0``); values outside
            [0, K) count as ignore_index.
        num_old: MiB's ``old_cl``: the background and the old classes, [0, num_old) (1 ≤ num_old < K).
        teacher_masks: (B, num_old, h, w) logits of the previous step's model at the same patch resolution
            (not differentiated), or None: then unkd is 0.
        kd_alpha: MiB's ``alpha`` (``--alpha``, default 1.0): the teacher's logits are scaled by it before
            its softmax.
        ignore_index: label of the pixels the CE leaves out (the distillation counts every pixel, as MiB's).

    Returns:
        (unce, unkd), 0-dim float32 (float64 for float64 masks): unce is the mean CE over the counted pixels
        (0 when none is counted, where MiB's mean is NaN); unkd is −mean over all B·H·W pixels of the
        per-pixel distillation term. See ``incrementer_fast/reference/mib_head.py``.

    Examples:
        >>> masks = torch.randn(2, 5, 4, 4, requires_grad=True)
        >>> labels = torch.randint(0, 5, (2, 16, 16))
        >>> unce, unkd = mib_head_loss(masks, labels, num_old=3, teacher_masks=torch.randn(2, 3, 4, 4))
        >>> (unce + 10 * unkd).backward()
    """
    check_mib_head_loss_args(masks, labels, num_old, teacher_masks, kd_alpha, ignore_index)
    if backend(masks.device) == "reference":
        return reference.mib_head_loss(masks, labels, num_old, teacher_masks, kd_alpha, ignore_index)
    teacher = None if teacher_masks is None else teacher_masks.detach()
    sums, _ = _mib_head_loss_fwd_op(masks, labels, teacher, num_old, float(kd_alpha), ignore_index)
    ce_sum, counted, kd_sum = sums.unbind(1)
    unce = ce_sum.sum() / counted.sum().clamp_min(1)
    if teacher is None:
        return unce, sums.new_zeros(())
    # The mean over every pixel of the batch (B·H·W is a Python int: no host synchronisation).
    return unce, -(kd_sum.sum() / max(labels.numel(), 1))
