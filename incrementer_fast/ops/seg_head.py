"""The segmentation head's loss and PLOP's pseudo-labelling from patch-resolution masks, as custom ops.

Public functions (definitions in ``incrementer_fast/reference/seg_head.py``, the spec):

* ``seg_head_loss(masks, labels, num_old, new_class_weight=1.0, ignore_index=255, smooth=1.0,
  image_weight=None, dice_labels=None) -> (ce, dice)``: masks (B, K, h, w) patch-resolution logits (any
  float dtype, any strides), labels (B, H, W) and dice_labels (B, H, W) any integer dtype; the pixel logits
  are the bilinear (align_corners=False) upsampling of masks to (H, W), never materialised.
  ce = PLOP's mean over all B·H·W pixels of image_weight[b]·w_y·CE (w = 1 for c < num_old, new_class_weight
  otherwise; ignored pixels add 0 and count); image_weight (B,) is PLOP's per-image factor (not
  differentiated); dice = ``cds_dice_loss`` on the same softmax with the masks M_new/M_old of
  ``dice_labels`` (the step's ground truth in training; ``labels`` when None). Label values outside
  [0, K) are ignore_index. Both 0-dim float32 (float64 for float64 masks); differentiable w.r.t. masks.
* ``entropy_histogram(teacher_masks, labels, num_bins=100, *, num_classes=None, entropy="plop") ->
  (K_old, num_bins) int64``,
* ``plop_thresholds(histogram, floor=0.001, *, median="plop") -> (K_old,) float32`` (plain torch:
  K_old·num_bins values),
* ``pseudo_label(teacher_masks, labels, thresholds, ignore_index=255, min_image_factor=0.0, *,
  num_classes=None, entropy="plop") -> (pseudo (B, H, W) int64, image_factor (B,))``.
  ``entropy="plop"`` (PLOP's released entropy, needs ``num_classes`` = K_total) or ``"normalized"``.

Structure of the kernel path of the loss: ``incrementer_fast::seg_head_loss_sums`` maps (masks, labels, dice_labels) to eight
per-image sums (B, 8) — CE over old-/new-class pixels of ``labels``, the counts of M_old/M_new of
``dice_labels`` and the four probability sums of the CDS dice (see ``kernels/seg_head.py``) — plus
per-pixel (lse, P_new, P_old) (B, 3, H, W) saved for the backward. The class weights, image weights, the
CE mean and the dice (``reference.dice_from_sums``) are a handful of (B,)-sized torch ops on those sums,
so autograd differentiates them and ``incrementer_fast::seg_head_loss_sums_backward`` receives the gradient of the sums (B, 8) and writes the
gradient of masks (B, K, h, w) directly. Memory: 3·B·H·W saved values and
the (B, K, h, w) gradient; no (B, K, H, W) tensor in forward or backward. The kernels' entropy histogram
keeps one int32 (K_old, num_bins) histogram per program, at most 512 copies (no shared hot addresses), summed
in a fixed order: ≈ 20 MB at K_old = 101, 100 bins.

Dispatch: each public function picks the implementation (``incrementer_fast._dispatch.backend``) before
the autograd boundary — the plain-PyTorch reference of ``incrementer_fast/reference/seg_head.py``
(materialised logits, differentiated by autograd) or the kernels of ``kernels/seg_head.py`` behind the
custom ops below.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_entropy_histogram_args, check_pseudo_label_args, check_seg_head_loss_args
from .._dispatch import HAS_TRITON, backend, check_kernels_run
from ..reference import seg_head as reference
from ..reference.core import compute_dtype, dice_from_sums
from ..reference.seg_head import image_factor, plop_thresholds

if HAS_TRITON:
    from ..kernels import seg_head as kernels

__all__ = ["seg_head_loss", "entropy_histogram", "plop_thresholds", "pseudo_label"]


# ------------------------------------------------------------------------------ loss: custom ops
@torch.library.custom_op("incrementer_fast::seg_head_loss_sums", mutates_args=())
def _seg_head_loss_fwd_op(
    masks: torch.Tensor, labels: torch.Tensor, dice_labels: torch.Tensor, num_old: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-image sums (B, 8), per-pixel (lse, P_new, P_old) (B, 3, H, W)), see kernels/seg_head.py."""
    check_kernels_run(masks.device)
    return kernels.seg_head_loss_forward(masks, labels, dice_labels, num_old, ignore_index)


@_seg_head_loss_fwd_op.register_fake
def _(masks, labels, dice_labels, num_old, ignore_index):
    acc = compute_dtype(masks.dtype)
    batch, height, width = labels.shape
    return (
        masks.new_empty((batch, kernels.NUM_SUMS), dtype=acc),
        masks.new_empty((batch, 3, height, width), dtype=acc),
    )


@torch.library.custom_op("incrementer_fast::seg_head_loss_sums_backward", mutates_args=())
def _seg_head_loss_bwd_op(
    grad_sums: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    dice_labels: torch.Tensor,
    pixel_stats: torch.Tensor,
    num_old: int,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient of masks (B, K, h, w) from the gradient of the sums (B, 8)."""
    return kernels.seg_head_loss_backward(grad_sums, masks, labels, dice_labels, pixel_stats, num_old, ignore_index)


@_seg_head_loss_bwd_op.register_fake
def _(grad_sums, masks, labels, dice_labels, pixel_stats, num_old, ignore_index):
    return torch.empty(masks.shape, dtype=masks.dtype, device=masks.device)


def _setup_context(ctx, inputs, output):
    masks, labels, dice_labels, num_old, ignore_index = inputs
    _, pixel_stats = output
    ctx.save_for_backward(masks, labels, dice_labels, pixel_stats)
    ctx.num_old = num_old
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_sums, grad_pixel_stats):
    # pixel_stats is an internal output: nothing differentiates it (its gradient is ignored).
    masks, labels, dice_labels, pixel_stats = ctx.saved_tensors
    if grad_sums is None:
        return None, None, None, None, None
    grad_masks = _seg_head_loss_bwd_op(grad_sums, masks, labels, dice_labels, pixel_stats, ctx.num_old,
                                       ctx.ignore_index)
    return grad_masks, None, None, None, None


_seg_head_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def seg_head_loss(
    masks: torch.Tensor,
    labels: torch.Tensor,
    num_old: int,
    new_class_weight: float = 1.0,
    ignore_index: int = 255,
    smooth: float = 1.0,
    image_weight: Optional[torch.Tensor] = None,
    dice_labels: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, dice) of patch-resolution masks (B, K, h, w) against labels (B, H, W), never materialising the
    (B, K, H, W) pixel logits.

    Args:
        masks: (B, K, h, w) patch-resolution logits, any float dtype and strides; differentiable.
        labels: (B, H, W) integer CE targets (the pseudo-labels in an incremental step). Values outside
            [0, K) count as ignore_index (``incrementer_fast.check_labels`` reports them if you want that).
        num_old: classes [0, num_old) are old, [num_old, K) new (1 ≤ num_old < K).
        new_class_weight: CE weight w_new of the new classes (CDS's down-weighting); old classes weigh 1.
        ignore_index: label of void / padding / uncertain pixels.
        smooth: the dice's smoothing term.
        image_weight: (B,) per-image CE factor (PLOP's ``classif_adaptive_factor``), not differentiated.
        dice_labels: (B, H, W) integer labels that define the dice's M_new / M_old (the step's ground truth
            in training, so that uncertain background pixels are in M_old); ``labels`` when None.

    Returns:
        (ce, dice), 0-dim float32 (float64 for float64 masks): ce is PLOP's mean over all B·H·W pixels of
        image_weight[b]·w_y·CE (ignored pixels add 0 and count in the mean); dice is the CDS old/new dice
        averaged over the images. Both 0, with zero gradients, for B = 0. See
        ``incrementer_fast/reference/seg_head.py`` for the full definition.

    Examples:
        >>> masks = torch.randn(2, 5, 4, 4, requires_grad=True)
        >>> labels = torch.randint(0, 5, (2, 16, 16))
        >>> ce, dice = seg_head_loss(masks, labels, num_old=3, new_class_weight=0.5)
        >>> (ce + 0.1 * dice).backward()
    """
    check_seg_head_loss_args(masks, labels, num_old, new_class_weight, ignore_index, smooth, image_weight,
                             dice_labels)
    if backend(masks.device) == "reference":
        return reference.seg_head_loss(masks, labels, num_old, new_class_weight, ignore_index, smooth, image_weight,
                                       dice_labels)
    sums, _ = _seg_head_loss_fwd_op(masks, labels, labels if dice_labels is None else dice_labels, num_old,
                                    ignore_index)
    ce_old, ce_new, count_old, count_new, inter_new, prob_new, inter_old, prob_old = sums.unbind(1)
    image_ce = ce_old + new_class_weight * ce_new
    if image_weight is not None:
        image_ce = image_ce * image_weight.detach().to(sums.dtype)
    # PLOP's mean over every pixel of the batch (B·H·W is a Python int: no host synchronisation).
    ce = image_ce.sum() / max(labels.numel(), 1)
    dice = dice_from_sums(torch.stack([inter_new, inter_old]), torch.stack([prob_new, prob_old]),
                          torch.stack([count_new, count_old]), smooth)
    return ce, dice


# ------------------------------------------------------------------------------ PLOP: custom ops
@torch.library.custom_op("incrementer_fast::plop_entropy_histogram", mutates_args=())
def _entropy_histogram_op(
    teacher_masks: torch.Tensor, labels: torch.Tensor, num_bins: int, num_classes: int, entropy: str
) -> torch.Tensor:
    check_kernels_run(teacher_masks.device)
    return kernels.entropy_histogram_forward(teacher_masks, labels, num_bins, num_classes, entropy)


@_entropy_histogram_op.register_fake
def _(teacher_masks, labels, num_bins, num_classes, entropy):
    return torch.empty((teacher_masks.shape[1], num_bins), dtype=torch.int64, device=teacher_masks.device)


@torch.library.custom_op("incrementer_fast::plop_pseudo_label", mutates_args=())
def _pseudo_label_op(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int,
    num_classes: int,
    entropy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels (B, H, W) int64, counts (B, 2) int64 = (#label-0 pixels, #pseudo-labelled))."""
    check_kernels_run(teacher_masks.device)
    return kernels.pseudo_label_forward(teacher_masks, labels, thresholds, ignore_index, num_classes, entropy)


@_pseudo_label_op.register_fake
def _(teacher_masks, labels, thresholds, ignore_index, num_classes, entropy):
    batch, height, width = labels.shape
    device = teacher_masks.device
    return (
        torch.empty((batch, height, width), dtype=torch.int64, device=device),
        torch.empty((batch, 2), dtype=torch.int64, device=device),
    )


def entropy_histogram(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    num_bins: int = 100,
    *,
    num_classes: Optional[int] = None,
    entropy: str = "plop",
) -> torch.Tensor:
    """(K_old, num_bins) int64 counts of label-0 pixels by teacher prediction and entropy bin (PLOP's histogram).

    Sum the histograms of all of a step's training batches, then call ``plop_thresholds``.

    Args:
        teacher_masks: (B, K_old, h, w) patch-resolution logits of the previous step's model.
        labels: (B, H, W) integer training labels of the step (background 0).
        num_bins: bins over the entropy's range (PLOP: 100).
        num_classes: K_total, the current step's class count (old and new; PLOP's ``nb_current_classes``):
            PLOP divides its entropy by log(K_total). Required for ``entropy="plop"``.
        entropy: ``"plop"`` (PLOP's released entropy, the default) or ``"normalized"`` (H(p) / log K_old);
            see ``incrementer_fast/reference/seg_head.py``.

    Returns:
        (K_old, num_bins) int64.

    Examples:
        >>> teacher = torch.randn(2, 16, 8, 8)
        >>> labels = torch.zeros(2, 64, 64, dtype=torch.long)
        >>> histogram = entropy_histogram(teacher, labels, num_classes=17)
        >>> thresholds = plop_thresholds(histogram)
    """
    check_entropy_histogram_args(teacher_masks, labels, num_bins, num_classes, entropy)
    if backend(teacher_masks.device) == "reference":
        return reference.entropy_histogram(teacher_masks, labels, num_bins, num_classes=num_classes, entropy=entropy)
    num_classes = teacher_masks.shape[1] if num_classes is None else num_classes
    return _entropy_histogram_op(teacher_masks.detach(), labels, num_bins, num_classes, entropy)


def pseudo_label(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int = 255,
    min_image_factor: float = 0.0,
    *,
    num_classes: Optional[int] = None,
    entropy: str = "plop",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels (B, H, W) int64, PLOP's per-image factor (B,)) from the teacher's patch-resolution masks.

    Args:
        teacher_masks: (B, K_old, h, w) patch-resolution logits of the previous step's model.
        labels: (B, H, W) integer training labels (background 0; other values are kept as they are).
        thresholds: (K_old,) per-class entropy thresholds (``plop_thresholds``).
        ignore_index: the label given to background pixels whose prediction is not confident.
        min_image_factor: lower clamp of the factor (PLOP's ``classif_adaptive_min_factor``).
        num_classes: K_total (required for ``entropy="plop"``), as in ``entropy_histogram``.
        entropy: ``"plop"`` or ``"normalized"``: must be the one the thresholds were computed with.

    Returns:
        pseudo (B, H, W) int64: label-0 pixels take the teacher's prediction where its entropy is below the
        prediction's threshold, else ignore_index; image_factor (B,) float32 (float64 for float64
        teacher_masks): n_pseudo / (n_background + 1e-6) per image (0 for an image without label-0
        pixels, as PLOP), clamped below at min_image_factor.

    Examples:
        >>> teacher = torch.randn(2, 16, 8, 8)
        >>> labels = torch.zeros(2, 64, 64, dtype=torch.long)
        >>> thresholds = plop_thresholds(entropy_histogram(teacher, labels, num_classes=17))
        >>> pseudo, factor = pseudo_label(teacher, labels, thresholds, num_classes=17)
    """
    check_pseudo_label_args(teacher_masks, labels, thresholds, ignore_index, min_image_factor, num_classes, entropy)
    if backend(teacher_masks.device) == "reference":
        return reference.pseudo_label(teacher_masks, labels, thresholds, ignore_index, min_image_factor,
                                      num_classes=num_classes, entropy=entropy)
    num_classes = teacher_masks.shape[1] if num_classes is None else num_classes
    pseudo, counts = _pseudo_label_op(
        teacher_masks.detach(), labels, thresholds.detach(), ignore_index, num_classes, entropy
    )
    return pseudo, image_factor(counts, compute_dtype(teacher_masks.dtype), min_image_factor)
