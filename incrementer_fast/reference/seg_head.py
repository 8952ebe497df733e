"""Plain-PyTorch references of the segmentation head's loss and of PLOP's pseudo-labelling: the spec.

Both start from *patch-resolution* masks (B, K, h, w): the logits of an image pixel are the bilinear
(align_corners=False) interpolation of the masks to the label resolution (H, W), exactly
``F.interpolate(masks, (H, W), mode="bilinear", align_corners=False)``. The references materialise those
(B, K, H, W) logits; the fused ops in ``incrementer_fast.ops.seg_head`` never do.

Segmentation loss
-----------------
``seg_head_loss(masks, labels, num_old, new_class_weight, ignore_index, smooth, image_weight)`` returns
``(ce, dice)``, both 0-dim in float32 (float64 for float64 masks):

* ``ce`` — the class-weighted mean cross-entropy of ``F.cross_entropy(logits, labels, weight=w,
  ignore_index=ignore_index)``, with w_c = new_class_weight for c ≥ num_old and 1 otherwise:
  ce = Σ_i a_b(i)·w_{y_i}·(−log softmax(z_i)_{y_i}) / Σ_i w_{y_i} over the valid pixels i (label ≠ ignore).
  a_b = image_weight[b] (1 when None) scales the numerator only: it is PLOP's per-image "classif adaptive
  factor" (see ``pseudo_label``), which PLOP multiplies into every pixel's loss before averaging.
  Deviation from ``F.cross_entropy``: when the denominator is 0 (every pixel ignored, or only new-class
  pixels with new_class_weight = 0) ce is 0 with zero gradients, where ``F.cross_entropy`` gives NaN.
  A label that is neither ignore_index nor in [0, K) is the caller's bug: the reference raises (PyTorch's
  out-of-bounds target error); the fused kernels cannot check without a host sync and treat its logit as
  absent (they never read out of bounds), so the value is undefined.
* ``dice`` — ``cds_dice_loss(logits, labels, num_old, ignore_index, smooth)`` on the same logits.

PLOP pseudo-labelling (Douillard et al., CVPR 2021, ``pseudo="entropy"`` in PLOP's ``train.py``)
-------------------------------------------------------------------------------------------------
The frozen teacher (the previous step's model) has K_old = teacher_masks.shape[1] classes. For each pixel,
p = softmax of the teacher's upsampled logits, its prediction is argmax_c p_c (the first index on ties, as
``torch.argmax``), and its normalised entropy is e = H(p) / log(K_old) ∈ [0, 1], H(p) = −Σ_c p_c log p_c.

1. ``entropy_histogram(teacher_masks, labels, num_bins=100)`` → (K_old, num_bins) int64: over the
   background pixels (label 0) of a batch, the count of pixels predicted as class c whose e falls in bin
   j = clamp(⌊e·num_bins⌋, 0, num_bins − 1) (bins of width 1/num_bins over [0, 1]). The caller sums the
   histograms of all of the step's training images (integer counts: exact and order-independent).
2. ``plop_thresholds(histogram, floor=0.001)`` → (K_old,) float32: per class, the median of e read from its
   histogram, linearly interpolated inside the bin that holds the half count (PLOP's approximation, which
   avoids keeping every pixel's entropy): with n_j the counts, half = Σ_j n_j / 2, j* the first bin whose
   cumulative count reaches half and C = the count before j*, median = (j* + (half − C) / n_{j*}) /
   num_bins. A class with no pixel gets 0. Then thresholds = max(median, floor).
3. ``pseudo_label(teacher_masks, labels, thresholds, ignore_index=255, min_image_factor=0.0)`` →
   (pseudo (B, H, W) int64, image_factor (B,)): a pixel with label 0 takes the teacher's argmax ĉ where
   e < thresholds[ĉ], else ignore_index; every other pixel keeps its label. image_factor[b] = (number of
   label-0 pixels of image b that took a pseudo-label) / (number of label-0 pixels), clamped below at
   min_image_factor: PLOP's ``classif_adaptive_factor``, meant as ``image_weight`` of ``seg_head_loss``.
   An image without label-0 pixels gets 1 (PLOP divides 0 by 0 there).

Where this follows PLOP's released code and where it deliberately does not:
* PLOP's ``entropy()`` takes the *mean* over classes of p·log(p + 1e-8) and divides by log(K_old), and the
  result is then divided by log(K_old + K_new) ("max_entropy"): its entropies are e / (K_old·log(K_total))
  — all of them inside the first one or two of its 100 bins — so its "median" is mostly the linear
  interpolation inside bin 0 and its 0.001 floor sits at a different place. We use the documented quantity,
  e = H / log(K_old) ∈ [0, 1], over which 100 bins resolve the median to 0.01. The 1e-8 inside the log
  is dropped (H is computed exactly from log-softmax).
* PLOP's histogram-median loop adds the bin *index* instead of the bin count to its running sum (a bug
  beyond the first bin); the correct cumulative count is used here.
* PLOP's background test at training time is ``labels < num_old``; at step t the training labels hold no
  old class but 0 (old classes are mapped to background), so ``labels == 0``, as in its histogram, is the
  same set; with labels == 0 a ground-truth old-class label is never overwritten.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import _shape, check_float, check_integer, check_ndim, check_same_device
from .core import cds_dice_loss, compute_dtype


# --------------------------------------------------------------------------------------------- checks
def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _check_number(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def _check_masks_labels(masks_name: str, masks, labels) -> None:
    check_float(masks_name, masks)
    check_integer("labels", labels)
    check_ndim(masks_name, masks, 4, "(B, K, h, w)")
    check_ndim("labels", labels, 3, "(B, H, W)")
    if masks.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{masks_name} (B, K, h, w) = {_shape(masks)} and labels (B, H, W) = {_shape(labels)} "
            "must have the same batch size B"
        )
    if masks.shape[2] == 0 or masks.shape[3] == 0:
        raise ValueError(f"{masks_name} (B, K, h, w) = {_shape(masks)} must have h, w >= 1")
    check_same_device(**{masks_name: masks, "labels": labels})


def check_seg_head_loss_args(masks, labels, num_old, new_class_weight, ignore_index, smooth, image_weight) -> None:
    """Shape/dtype/argument validation of ``seg_head_loss`` (no host synchronisation)."""
    _check_masks_labels("masks", masks, labels)
    num_classes = masks.shape[1]
    _check_int("num_old", num_old)
    if not 1 <= num_old < num_classes:
        raise ValueError(
            f"num_old must be an int in [1, K) with K = {num_classes} (masks {_shape(masks)}), got {num_old!r}"
        )
    _check_number("new_class_weight", new_class_weight)
    if not new_class_weight >= 0:
        raise ValueError(f"new_class_weight must be >= 0, got {new_class_weight!r}")
    _check_int("ignore_index", ignore_index)
    _check_number("smooth", smooth)
    if not smooth >= 0:
        raise ValueError(f"smooth must be a non-negative float, got {smooth!r}")
    if image_weight is not None:
        check_float("image_weight", image_weight)
        if tuple(image_weight.shape) != (masks.shape[0],):
            raise ValueError(
                f"image_weight must have shape (B,) = ({masks.shape[0]},) for masks (B, K, h, w) = "
                f"{_shape(masks)}, got {_shape(image_weight)}"
            )
        check_same_device(masks=masks, image_weight=image_weight)


def check_entropy_histogram_args(teacher_masks, labels, num_bins) -> None:
    _check_masks_labels("teacher_masks", teacher_masks, labels)
    if teacher_masks.shape[1] < 2:
        raise ValueError(f"teacher_masks (B, K_old, h, w) = {_shape(teacher_masks)} must have K_old >= 2")
    _check_int("num_bins", num_bins)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")


def check_pseudo_label_args(teacher_masks, labels, thresholds, ignore_index, min_image_factor) -> None:
    _check_masks_labels("teacher_masks", teacher_masks, labels)
    if teacher_masks.shape[1] < 2:
        raise ValueError(f"teacher_masks (B, K_old, h, w) = {_shape(teacher_masks)} must have K_old >= 2")
    check_float("thresholds", thresholds)
    if tuple(thresholds.shape) != (teacher_masks.shape[1],):
        raise ValueError(
            f"thresholds must have shape (K_old,) = ({teacher_masks.shape[1]},) for teacher_masks "
            f"(B, K_old, h, w) = {_shape(teacher_masks)}, got {_shape(thresholds)}"
        )
    check_same_device(teacher_masks=teacher_masks, thresholds=thresholds)
    _check_int("ignore_index", ignore_index)
    _check_number("min_image_factor", min_image_factor)


def check_plop_thresholds_args(histogram, floor) -> None:
    check_integer("histogram", histogram)
    check_ndim("histogram", histogram, 2, "(K_old, num_bins)")
    if histogram.shape[1] < 1:
        raise ValueError(f"histogram (K_old, num_bins) = {_shape(histogram)} must have num_bins >= 1")
    _check_number("floor", floor)


# ------------------------------------------------------------------------------------------- loss
def upsample_logits(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) → (B, K, H, W) pixel logits in the compute dtype (bilinear, align_corners=False)."""
    return F.interpolate(masks.to(compute_dtype(masks.dtype)), size=size, mode="bilinear", align_corners=False)


def class_weights(num_classes: int, num_old: int, new_class_weight: float, dtype, device) -> torch.Tensor:
    """w_c = 1 for the old classes c < num_old, new_class_weight for the new ones."""
    weight = torch.ones(num_classes, dtype=dtype, device=device)
    weight[num_old:] = new_class_weight
    return weight


def seg_head_loss(
    masks: torch.Tensor,
    labels: torch.Tensor,
    num_old: int,
    new_class_weight: float = 1.0,
    ignore_index: int = 255,
    smooth: float = 1.0,
    image_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, dice) of patch-resolution masks (B, K, h, w) against labels (B, H, W); see the module docstring."""
    check_seg_head_loss_args(masks, labels, num_old, new_class_weight, ignore_index, smooth, image_weight)
    logits = upsample_logits(masks, tuple(labels.shape[1:]))
    acc = logits.dtype
    weight = class_weights(masks.shape[1], num_old, new_class_weight, acc, masks.device)
    labels = labels.long()
    # reduction="none" gives w_{y_i}·CE_i and 0 at ignored pixels.
    weighted_ce = F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index, reduction="none")
    if image_weight is not None:
        weighted_ce = weighted_ce * image_weight.detach().to(acc)[:, None, None]
    valid = labels != ignore_index
    pixel_weight = weight[labels.clamp(0, masks.shape[1] - 1)] * valid
    numerator = weighted_ce.sum()
    denominator = pixel_weight.sum()
    nonzero = denominator != 0
    # where() on both sides: the unused branch must not give NaN gradients when nothing is counted.
    ce = torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1.0), 0.0)
    dice = cds_dice_loss(logits, labels, num_old, ignore_index, smooth)
    return ce, dice


# ------------------------------------------------------------------------------------------- PLOP
def teacher_prediction(teacher_masks: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax (B, H, W) int64, normalised entropy e = H(p)/log(K_old) (B, H, W)) of the upsampled teacher."""
    logits = upsample_logits(teacher_masks, size)
    log_probs = torch.log_softmax(logits, dim=1)
    entropy = -(log_probs.exp() * log_probs).sum(1) / math.log(teacher_masks.shape[1])
    return logits.argmax(1), entropy


def entropy_bins(entropy: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Histogram bin of each normalised entropy: clamp(⌊e·num_bins⌋, 0, num_bins − 1)."""
    return torch.floor(entropy * num_bins).long().clamp(0, num_bins - 1)


@torch.no_grad()
def entropy_histogram(teacher_masks: torch.Tensor, labels: torch.Tensor, num_bins: int = 100) -> torch.Tensor:
    """(K_old, num_bins) int64 counts of the label-0 pixels by teacher argmax and normalised-entropy bin."""
    check_entropy_histogram_args(teacher_masks, labels, num_bins)
    num_old = teacher_masks.shape[1]
    prediction, entropy = teacher_prediction(teacher_masks, tuple(labels.shape[1:]))
    background = labels == 0
    flat_index = prediction * num_bins + entropy_bins(entropy, num_bins)
    # Non-background pixels go to a spare last slot that is dropped: no boolean indexing, no host sync.
    flat_index = torch.where(background, flat_index, num_old * num_bins)
    counts = torch.zeros(num_old * num_bins + 1, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(0, flat_index.reshape(-1), torch.ones_like(flat_index.reshape(-1)))
    return counts[:-1].reshape(num_old, num_bins)


@torch.no_grad()
def plop_thresholds(histogram: torch.Tensor, floor: float = 0.001) -> torch.Tensor:
    """(K_old,) float32 per-class entropy thresholds: the histogram median of each row, floored at ``floor``."""
    check_plop_thresholds_args(histogram, floor)
    num_bins = histogram.shape[1]
    counts = histogram.to(torch.float64)
    total = counts.sum(1, keepdim=True)
    half = total / 2
    cumulative = counts.cumsum(1)
    # First bin whose cumulative count reaches half; that bin is never empty when total > 0.
    median_bin = torch.searchsorted(cumulative, half, right=False).clamp(max=num_bins - 1)
    count_in_bin = counts.gather(1, median_bin)
    count_before = cumulative.gather(1, median_bin) - count_in_bin
    fraction = (half - count_before) / count_in_bin.clamp_min(1)
    median = ((median_bin.to(torch.float64) + fraction) / num_bins).squeeze(1)
    median = torch.where(total.squeeze(1) > 0, median, 0.0)
    return median.clamp_min(floor).to(torch.float32)


def pseudo_label_counts(
    teacher_masks: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels (B, H, W) int64, counts (B, 2) int64 = (#label-0 pixels, #pseudo-labelled)) per image."""
    acc = compute_dtype(teacher_masks.dtype)
    prediction, entropy = teacher_prediction(teacher_masks, tuple(labels.shape[1:]))
    labels = labels.long()
    background = labels == 0
    confident = background & (entropy < thresholds.to(acc)[prediction])
    pseudo = torch.where(background, torch.where(confident, prediction, ignore_index), labels)
    return pseudo, torch.stack([background.sum((1, 2)), confident.sum((1, 2))], dim=1)


def image_factor(counts: torch.Tensor, dtype: torch.dtype, min_image_factor: float) -> torch.Tensor:
    """PLOP's per-image factor from pseudo_label_counts: #pseudo-labelled / #label-0 (1 when none), clamped."""
    num_background = counts[:, 0].to(dtype)
    num_confident = counts[:, 1].to(dtype)
    factor = torch.where(num_background > 0, num_confident / num_background.clamp_min(1), 1.0)
    return factor.clamp_min(min_image_factor)


@torch.no_grad()
def pseudo_label(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int = 255,
    min_image_factor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels (B, H, W) int64, per-image factor (B,)) by PLOP's entropy rule; see the module docstring.

    The factor is float32 (float64 for float64 teacher_masks).
    """
    check_pseudo_label_args(teacher_masks, labels, thresholds, ignore_index, min_image_factor)
    pseudo, counts = pseudo_label_counts(teacher_masks, labels, thresholds, ignore_index)
    return pseudo, image_factor(counts, compute_dtype(teacher_masks.dtype), min_image_factor)
