"""The segmentation head's loss and PLOP's pseudo-labelling from patch-resolution masks, as custom ops.

Public functions (definitions in ``incrementer_fast/reference/seg_head.py``, the spec):

* ``seg_head_loss(masks, labels, num_old, new_class_weight=1.0, ignore_index=255, smooth=1.0,
  image_weight=None) -> (ce, dice)``: masks (B, K, h, w) patch-resolution logits (any float dtype, any
  strides), labels (B, H, W) any integer dtype; the pixel logits are the bilinear (align_corners=False)
  upsampling of masks to (H, W), never materialised. ce = class-weighted mean cross-entropy (weights 1 for
  c < num_old, new_class_weight otherwise, ``F.cross_entropy`` semantics, but 0 — not NaN — when no pixel
  counts), image_weight (B,) scales each image's CE terms in the numerator (PLOP's per-image factor; not
  differentiated); dice = ``cds_dice_loss`` on the same softmax. Both 0-dim float32 (float64 for float64
  masks); differentiable w.r.t. masks.
* ``entropy_histogram(teacher_masks, labels, num_bins=100) -> (K_old, num_bins) int64``,
* ``plop_thresholds(histogram, floor=0.001) -> (K_old,) float32`` (plain torch: K_old·num_bins values),
* ``pseudo_label(teacher_masks, labels, thresholds, ignore_index=255, min_image_factor=0.0) ->
  (pseudo (B, H, W) int64, image_factor (B,))``.

Structure of the loss op: ``incrementer_fast::seg_head_sums`` maps (masks, labels) to eight per-image sums
(B, 8) — CE over old-/new-class pixels, their counts, and the four probability sums of the CDS dice (see
``kernels/seg_head.py``) — plus per-pixel (lse, P_new, P_old) (B, 3, H, W) saved for the backward. The
class weights, image weights, the CE mean and the dice are a handful of (B,)-sized torch ops on those sums,
so autograd differentiates them and ``incrementer_fast::seg_head_sums_backward`` receives the gradient of
the sums (B, 8) and writes the gradient of masks (B, K, h, w) directly. Memory: 3·B·H·W saved values and
the (B, K, h, w) gradient; no (B, K, H, W) tensor in forward or backward.

Backends (``incrementer_fast._dispatch.backend``): Triton kernels on CUDA (and on CPU under
TRITON_INTERPRET=1); otherwise the sums are computed from materialised logits (the reference's upsampling)
and their backward is the same VJP written out in torch (a custom op's implementation runs below autograd).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._dispatch import backend
from ..reference.core import compute_dtype
from ..reference.seg_head import entropy_histogram as reference_entropy_histogram
from ..reference.seg_head import (
    check_entropy_histogram_args,
    check_pseudo_label_args,
    check_seg_head_loss_args,
    image_factor,
    plop_thresholds,
    pseudo_label_counts,
    upsample_logits,
)

__all__ = ["seg_head_loss", "entropy_histogram", "plop_thresholds", "pseudo_label"]

NUM_SUMS = 8


def _kernels():
    from incrementer_fast.kernels import seg_head as kernels  # imported lazily: triton is optional on CPU

    return kernels


# ------------------------------------------------------------------------------ loss: reference path
def _reference_sums(masks: torch.Tensor, labels: torch.Tensor, num_old: int, ignore_index: int):
    """The eight per-image sums and per-pixel (lse, P_new, P_old) from materialised logits (the spec's path)."""
    logits = upsample_logits(masks, tuple(labels.shape[1:]))
    labels = labels.long()
    lse = torch.logsumexp(logits, dim=1)
    probs = torch.softmax(logits, dim=1)
    p_new = probs[:, num_old:].sum(1)
    p_old = probs[:, :num_old].sum(1)
    valid = labels != ignore_index
    label_new = valid & (labels >= num_old)
    label_old = valid & (labels < num_old)
    # Labels outside [0, K) are the caller's bug (see the spec); clamp only so that gather stays in bounds.
    label_logit = logits.gather(1, labels.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    ce = lse - label_logit
    acc = logits.dtype
    zero = torch.zeros((), dtype=acc, device=logits.device)

    def image_sum(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return torch.where(where, values, zero).sum((1, 2))

    sums = torch.stack(
        [
            image_sum(ce, label_old),
            image_sum(ce, label_new),
            label_old.sum((1, 2)).to(acc),
            label_new.sum((1, 2)).to(acc),
            image_sum(p_new, label_new),
            image_sum(p_new, valid),
            image_sum(p_old, label_old),
            image_sum(p_old, valid),
        ],
        dim=1,
    )
    return sums, torch.stack([lse, p_new, p_old], dim=1)


def _interpolation_matrix(size_in: int, size_out: int, dtype, device) -> torch.Tensor:
    """A (size_out, size_in): row d holds the bilinear (align_corners=False) weights of output index d."""
    scale = size_in / size_out
    src = ((torch.arange(size_out, dtype=dtype, device=device) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=size_in - 1)
    lam = src - i0.to(dtype)
    rows = torch.arange(size_out, device=device)
    matrix = torch.zeros((size_out, size_in), dtype=dtype, device=device)
    matrix.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    matrix.index_put_((rows, i1), lam, accumulate=True)
    return matrix


def _reference_sums_backward(grad_sums, masks, labels, num_old: int, ignore_index: int) -> torch.Tensor:
    """Gradient of masks from the gradient of the eight sums, with materialised logits (the reference path).

    The custom op's implementation runs below autograd, so the VJP is written out (the formulas are the
    kernels', see kernels/seg_head.py): dz_c = G_ce·(p_c − [c = y]) + G_p·p_c·(P_old if c ≥ num_old else
    −P_new) per pixel, then the transpose of the interpolation, dm = Ayᵀ·dz·Ax.
    """
    batch, num_classes, h, w = masks.shape
    height, width = labels.shape[1:]
    logits = upsample_logits(masks, (height, width))
    acc = logits.dtype
    labels = labels.long()
    probs = torch.softmax(logits, dim=1)
    p_new = probs[:, num_old:].sum(1, keepdim=True)
    p_old = probs[:, :num_old].sum(1, keepdim=True)
    valid = labels != ignore_index
    label_new = (valid & (labels >= num_old)).to(acc)
    label_old = (valid & (labels < num_old)).to(acc)
    valid = valid.to(acc)
    g = grad_sums.to(acc)[:, :, None, None]
    g_ce = g[:, 0] * label_old + g[:, 1] * label_new
    g_p = g[:, 4] * label_new + (g[:, 5] - g[:, 7]) * valid - g[:, 6] * label_old
    classes = torch.arange(num_classes, device=masks.device)[None, :, None, None]
    one_hot = (classes == labels[:, None]).to(acc)
    mass_factor = torch.where(classes >= num_old, p_old, -p_new)
    dz = g_ce[:, None] * (probs - one_hot) + g_p[:, None] * probs * mass_factor
    rows = _interpolation_matrix(h, height, acc, masks.device)
    cols = _interpolation_matrix(w, width, acc, masks.device)
    grad = torch.einsum("yY,bkyx,xX->bkYX", rows, dz, cols)
    return grad.to(masks.dtype).contiguous()


# ------------------------------------------------------------------------------ loss: custom ops
@torch.library.custom_op("incrementer_fast::seg_head_sums", mutates_args=())
def _seg_head_sums(
    masks: torch.Tensor, labels: torch.Tensor, num_old: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend(masks.device) == "triton":
        return _kernels().seg_head_sums(masks, labels, num_old, ignore_index)
    sums, pixel_stats = _reference_sums(masks, labels, num_old, ignore_index)
    return sums.contiguous(), pixel_stats.contiguous()


@_seg_head_sums.register_fake
def _(masks, labels, num_old, ignore_index):
    acc = compute_dtype(masks.dtype)
    batch, height, width = labels.shape
    return (
        masks.new_empty((batch, NUM_SUMS), dtype=acc),
        masks.new_empty((batch, 3, height, width), dtype=acc),
    )


@torch.library.custom_op("incrementer_fast::seg_head_sums_backward", mutates_args=())
def _seg_head_sums_backward(
    grad_sums: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    pixel_stats: torch.Tensor,
    num_old: int,
    ignore_index: int,
) -> torch.Tensor:
    if backend(masks.device) == "triton":
        return _kernels().seg_head_sums_backward(grad_sums, masks, labels, pixel_stats, num_old, ignore_index)
    return _reference_sums_backward(grad_sums, masks, labels, num_old, ignore_index)


@_seg_head_sums_backward.register_fake
def _(grad_sums, masks, labels, pixel_stats, num_old, ignore_index):
    return torch.empty(masks.shape, dtype=masks.dtype, device=masks.device)


def _setup_context(ctx, inputs, output):
    masks, labels, num_old, ignore_index = inputs
    _, pixel_stats = output
    ctx.save_for_backward(masks, labels, pixel_stats)
    ctx.num_old = num_old
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_sums, grad_pixel_stats):
    # pixel_stats is an internal output: nothing differentiates it (its gradient is ignored).
    masks, labels, pixel_stats = ctx.saved_tensors
    if grad_sums is None:
        return None, None, None, None
    grad_masks = _seg_head_sums_backward(grad_sums, masks, labels, pixel_stats, ctx.num_old, ctx.ignore_index)
    return grad_masks, None, None, None


_seg_head_sums.register_autograd(_backward, setup_context=_setup_context)


def seg_head_loss(
    masks: torch.Tensor,
    labels: torch.Tensor,
    num_old: int,
    new_class_weight: float = 1.0,
    ignore_index: int = 255,
    smooth: float = 1.0,
    image_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, dice) of patch-resolution masks (B, K, h, w) against labels (B, H, W); see the module docstring."""
    check_seg_head_loss_args(masks, labels, num_old, new_class_weight, ignore_index, smooth, image_weight)
    sums, _ = _seg_head_sums(masks, labels, num_old, ignore_index)
    ce_old, ce_new, count_old, count_new, inter_new, prob_new, inter_old, prob_old = sums.unbind(1)
    image_ce = ce_old + new_class_weight * ce_new
    if image_weight is not None:
        image_ce = image_ce * image_weight.detach().to(sums.dtype)
    numerator = image_ce.sum()
    denominator = (count_old + new_class_weight * count_new).sum()
    nonzero = denominator != 0
    # where() on both sides: the unused branch must not give NaN gradients when nothing is counted.
    ce = torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1.0), 0.0)
    dice_new = 1.0 - (2.0 * inter_new + smooth) / (prob_new + count_new + smooth)
    dice_old = 1.0 - (2.0 * inter_old + smooth) / (prob_old + count_old + smooth)
    dice = (dice_new + dice_old).mean()
    return ce, dice


# ------------------------------------------------------------------------------ PLOP: custom ops
@torch.library.custom_op("incrementer_fast::plop_entropy_histogram", mutates_args=())
def _entropy_histogram(teacher_masks: torch.Tensor, labels: torch.Tensor, num_bins: int) -> torch.Tensor:
    if backend(teacher_masks.device) == "triton":
        return _kernels().teacher_histogram(teacher_masks, labels, num_bins)
    return reference_entropy_histogram(teacher_masks, labels, num_bins)


@_entropy_histogram.register_fake
def _(teacher_masks, labels, num_bins):
    return torch.empty((teacher_masks.shape[1], num_bins), dtype=torch.int64, device=teacher_masks.device)


@torch.library.custom_op("incrementer_fast::plop_pseudo_label", mutates_args=())
def _pseudo_label(
    teacher_masks: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend(teacher_masks.device) == "triton":
        return _kernels().pseudo_label(teacher_masks, labels, thresholds, ignore_index)
    return pseudo_label_counts(teacher_masks, labels, thresholds, ignore_index)


@_pseudo_label.register_fake
def _(teacher_masks, labels, thresholds, ignore_index):
    batch, height, width = labels.shape
    device = teacher_masks.device
    return (
        torch.empty((batch, height, width), dtype=torch.int64, device=device),
        torch.empty((batch, 2), dtype=torch.int64, device=device),
    )


def entropy_histogram(teacher_masks: torch.Tensor, labels: torch.Tensor, num_bins: int = 100) -> torch.Tensor:
    """(K_old, num_bins) int64 counts of label-0 pixels by teacher argmax and normalised-entropy bin.

    Sum the histograms of all of a step's training batches, then call ``plop_thresholds``.
    """
    check_entropy_histogram_args(teacher_masks, labels, num_bins)
    return _entropy_histogram(teacher_masks.detach(), labels, num_bins)


def pseudo_label(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int = 255,
    min_image_factor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels (B, H, W) int64, PLOP's per-image factor (B,)) from the teacher's patch-resolution masks.

    image_factor is float32 (float64 for float64 teacher_masks): the fraction of each image's label-0 pixels
    that took a pseudo-label (1 for an image without label-0 pixels), clamped below at min_image_factor.
    """
    check_pseudo_label_args(teacher_masks, labels, thresholds, ignore_index, min_image_factor)
    pseudo, counts = _pseudo_label(teacher_masks.detach(), labels, thresholds.detach(), ignore_index)
    return pseudo, image_factor(counts, compute_dtype(teacher_masks.dtype), min_image_factor)
