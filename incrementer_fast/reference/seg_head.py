"""Plain-PyTorch references of the segmentation head's loss and of PLOP's pseudo-labelling: the spec.

Both start from *patch-resolution* masks (B, K, h, w): the logits of an image pixel are the bilinear
(align_corners=False) interpolation of the masks to the label resolution (H, W), exactly
``F.interpolate(masks, (H, W), mode="bilinear", align_corners=False)`` — what PLOP's model does to its
decoder output (``segmentation_module.py``) before every use of the logits. The references materialise
those (B, K, H, W) logits; the fused ops in ``incrementer_fast.ops.seg_head`` never do.

Labels. A label value that is neither ``ignore_index`` nor a class in [0, K) is treated as ``ignore_index``
everywhere in the loss (no error: checking values would make the host wait for the device). To be told
about such values instead, call ``incrementer_fast.check_labels(labels, K, ignore_index)`` yourself.

Segmentation loss
-----------------
``seg_head_loss(masks, labels, num_old, new_class_weight, ignore_index, smooth, image_weight, dice_labels)``
returns ``(ce, dice)``, both 0-dim in float32 (float64 for float64 masks):

* ``ce`` — PLOP's normalisation (``train.py``: ``CrossEntropyLoss(reduction="none")``, times the image
  factor, then ``loss.mean()``): the mean over ALL B·H·W pixels of a_b·w_{y_i}·CE_i, where
  CE_i = −log softmax(z_i)_{y_i}, w_c = new_class_weight for c ≥ num_old and 1 otherwise (CDS's
  down-weighting of the new classes), a_b = image_weight[b] (1 when None; PLOP's per-image
  ``classif_adaptive_factor``, not differentiated) — an ignored pixel adds 0 to the sum and still counts in
  the B·H·W. So new_class_weight scales the new classes' loss on every batch (a mean over Σ w would cancel
  it on a batch whose counted pixels are all new). 0 when B·H·W = 0.
* ``dice`` — CDS's old/new dice (``cds_dice_loss``) on the same softmax, with its masks taken from
  ``dice_labels`` (``labels`` when None): M_new = pixels whose label is a new class (num_old ≤ label < K),
  M_old = pixels whose label is an old class (0 ≤ label < num_old); ignore_index (the void label and crop
  padding) is in neither. In training ``labels`` are the pseudo-labels and ``dice_labels`` the step's ground
  truth (old classes mapped to background 0): the uncertain background pixels that the pseudo-labels
  ignore — where new classes get over-predicted — are in M_old, as the paper's complement M_old = ¬M_new
  over the labelled pixels. 0 when B = 0.

PLOP pseudo-labelling (Douillard et al., CVPR 2021; ``--pseudo entropy`` of its released ``train.py``)
-----------------------------------------------------------------------------------------------------
The frozen teacher (the previous step's model) has K_old = teacher_masks.shape[1] classes; the current step
has K_total = ``num_classes`` (old and new; PLOP's ``nb_current_classes``). p = softmax of the teacher's
upsampled logits. Two definitions of a pixel's entropy e, chosen by ``entropy``:

* ``"plop"`` (default) — PLOP's released code exactly, computed with the same torch operations in the
  same order so that float32 results are bit-identical (``tests/test_pseudo_label.py`` checks this against a
  transcription of PLOP's code)::

      e = −(1 / ln(K_old + 1e-8)) · mean_c(p_c · log(p_c + 1e-8)) / log(K_total)

  (PLOP's ``entropy()`` divided by the trainer's ``max_entropy``). Its quirks, reproduced: (a) the *mean*
  over the K_old classes where the entropy has a sum, and a second division, by log(K_total), on top of
  ``entropy()``'s own by log(K_old): e = H(p) / (K_old · ln K_old · ln K_total) (up to the 1e-8), so every
  e is below 1/(K_old·ln K_total) — 0.022 at VOC 15-1 (16, 17), 0.002 at ADE 100-50 (101, 151) — and
  falls in the first one to three of the 100 bins; (b) the 1e-8 inside the log; (c) ln(K_total) is the
  float32 ``torch.log`` of K_total (in the teacher's compute dtype); the prediction is the argmax of the
  probabilities (first index on ties), not of the logits.
* ``"normalized"`` — the documented quantity e = H(p) / ln K_old ∈ [0, 1], H(p) = −Σ_c p_c ln p_c from the
  log-softmax, prediction = argmax of the logits: a departure from PLOP, kept as an option because its 100
  bins resolve the median to 0.01 of the full entropy range.

1. ``entropy_histogram(teacher_masks, labels, num_bins=100, num_classes=, entropy=)`` → (K_old, num_bins)
   int64: over the background pixels (label 0) of a batch, the count of pixels predicted as class c whose e
   falls in bin j = min(⌊e·num_bins⌋, num_bins − 1). The caller sums the histograms of all of the step's
   training images (integer counts: exact and order-independent). (PLOP's histogram has K_total rows, the
   rows ≥ K_old always empty.)
2. ``plop_thresholds(histogram, floor=0.001, median=)`` → (K_old,) float32 per-class thresholds:

   * ``median="plop"`` (default) — PLOP's ``find_median`` exactly, quirks included: (a) its running sum
     adds the bin's *index* (as the float ``(i / num_bins) · num_bins``) instead of the bin's count, so the
     search stops at the first bin i with S_i ≤ half ≤ S_i + n_i (S_i = Σ_{j<i} j, half = total / 2 in
     float32), or runs through every bin; (b) the bin it reads is ``int((i / num_bins) · num_bins)``, which
     is i − 1 for i = 29, 57, 58 at 100 bins (float rounding); (c) median = i/num_bins + (half − S)/n ·
     (1/num_bins) with float32 arithmetic, where after a search that found no bin i = num_bins − 1 and S
     includes its last increment (the value can then be negative, above 1, or NaN when n = 0); (d) a class
     never predicted gets 0; (e) then max(threshold, floor) as Python's ``max`` does it (a NaN stays NaN,
     and compares false: no pixel of that class passes).
   * ``median="interpolated"`` — the histogram median with the correct cumulative count: j* the first bin
     whose cumulative count reaches half, C the count before it, median = (j* + (half − C)/n_{j*}) /
     num_bins; 0 for a class with no pixel; then max(median, floor).

3. ``pseudo_label(teacher_masks, labels, thresholds, ignore_index=255, min_image_factor=0.0, num_classes=,
   entropy=)`` → (pseudo (B, H, W) int64, image_factor (B,)): a pixel with label 0 takes the teacher's
   prediction ĉ where e < thresholds[ĉ], else ignore_index; every other pixel keeps its label.
   image_factor[b] = n_pseudo / (n_background + 1e-6) — the number of label-0 pixels of image b that took a
   pseudo-label over the number of label-0 pixels, PLOP's ``classif_adaptive_factor`` with its 1e-6 — then
   clamped below at min_image_factor (PLOP's ``classif_adaptive_min_factor``, default 0). Quirk kept: an
   image without label-0 pixels gets 0, so its whole CE (new classes included) vanishes.

Where this still departs from PLOP, and why:
* The background test is ``labels == 0`` everywhere. PLOP's trainer uses ``labels < num_old`` at training
  and ``labels == 0`` in ``find_median``; with its (and our) training labels — old classes mapped to 0 —
  the two are the same set, and ``== 0`` never overwrites a ground-truth old-class label.
* Our teacher logits are float32 (float64 for float64 masks); PLOP's run under apex O1, where the logits
  may be float16 before the float32 softmax.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import (
    check_entropy_histogram_args,
    check_plop_thresholds_args,
    check_pseudo_label_args,
    check_seg_head_loss_args,
)
from .core import cds_dice_loss, compute_dtype
# PLOP's classif_adaptive_factor: n_pseudo / (n_background + 1e-6) (train.py, after the fix of its 0/0).
IMAGE_FACTOR_EPS = 1e-6
# PLOP's entropy(): log(p + 1e-8) and 1 / log(K + 1e-8).
PLOP_ENTROPY_EPS = 1e-8


# ------------------------------------------------------------------------------------------- loss
def upsample_logits(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) → (B, K, H, W) pixel logits in the compute dtype (bilinear, align_corners=False)."""
    return F.interpolate(masks.to(compute_dtype(masks.dtype)), size=size, mode="bilinear", align_corners=False)


def class_weights(num_classes: int, num_old: int, new_class_weight: float, dtype, device) -> torch.Tensor:
    """w_c = 1 for the old classes c < num_old, new_class_weight for the new ones."""
    weight = torch.ones(num_classes, dtype=dtype, device=device)
    weight[num_old:] = new_class_weight
    return weight


def labels_in_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """int64 labels with every value outside [0, num_classes) replaced by ignore_index (see the module doc)."""
    labels = labels.long()
    return torch.where((labels >= 0) & (labels < num_classes), labels, ignore_index)


def seg_head_loss(
    masks: torch.Tensor,
    labels: torch.Tensor,
    num_old: int,
    new_class_weight: float = 1.0,
    ignore_index: int = 255,
    smooth: float = 1.0,
    image_weight: torch.Tensor | None = None,
    dice_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, dice) of patch-resolution masks (B, K, h, w) against labels (B, H, W); see the module docstring."""
    check_seg_head_loss_args(masks, labels, num_old, new_class_weight, ignore_index, smooth, image_weight,
                             dice_labels)
    num_classes = masks.shape[1]
    logits = upsample_logits(masks, tuple(labels.shape[1:]))
    acc = logits.dtype
    weight = class_weights(num_classes, num_old, new_class_weight, acc, masks.device)
    ce_labels = labels_in_range(labels, num_classes, ignore_index)
    dice_labels = ce_labels if dice_labels is None else labels_in_range(dice_labels, num_classes, ignore_index)
    # reduction="none" gives w_{y_i}·CE_i and 0 at ignored pixels; PLOP's mean is over every pixel.
    pixel_loss = F.cross_entropy(logits, ce_labels, weight=weight, ignore_index=ignore_index, reduction="none")
    if image_weight is not None:
        pixel_loss = pixel_loss * image_weight.detach().to(acc)[:, None, None]
    ce = pixel_loss.sum() / max(pixel_loss.numel(), 1)
    if masks.shape[0] == 0:
        dice = logits.sum()  # 0, with zero gradients: the dice's mean over no image
    else:
        dice = cds_dice_loss(logits, dice_labels, num_old, ignore_index, smooth)
    return ce, dice


# ------------------------------------------------------------------------------------------- PLOP
def plop_max_entropy(num_classes: int, dtype: torch.dtype, device) -> torch.Tensor:
    """PLOP's ``max_entropy``: ``torch.log`` of K_total in the given dtype (0-dim; no host transfer)."""
    return torch.full((), float(num_classes), dtype=dtype, device=device).log()


def teacher_prediction(
    teacher_masks: torch.Tensor, size: tuple[int, int], entropy: str = "plop", num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction (B, H, W) int64, entropy e (B, H, W)) of the upsampled teacher; e as ``entropy`` defines it.

    See the module docstring; ``num_classes`` (K_total) is needed only for ``entropy="plop"``.
    """
    logits = upsample_logits(teacher_masks, size)
    num_old = teacher_masks.shape[1]
    if entropy == "normalized":
        log_probs = torch.log_softmax(logits, dim=1)
        normalized = -(log_probs.exp() * log_probs).sum(1) / math.log(num_old)
        return logits.argmax(1), normalized
    # PLOP's operations, in its order: softmax; −(1/ln(K_old + ε))·mean(p·log(p + ε)); ÷ log(K_total).
    probs = torch.softmax(logits, dim=1)
    plop = -(1 / math.log(num_old + PLOP_ENTROPY_EPS)) * torch.mean(probs * torch.log(probs + PLOP_ENTROPY_EPS), dim=1)
    plop = plop / plop_max_entropy(num_classes, probs.dtype, probs.device)
    return probs.argmax(1), plop


def entropy_bins(entropy: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Histogram bin of each entropy: min(⌊e·num_bins⌋, num_bins − 1) (e ≥ 0; PLOP's ``.long()`` truncation)."""
    return torch.floor(entropy * num_bins).long().clamp(0, num_bins - 1)


@torch.no_grad()
def entropy_histogram(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    num_bins: int = 100,
    *,
    num_classes: int | None = None,
    entropy: str = "plop",
) -> torch.Tensor:
    """(K_old, num_bins) int64 counts of the label-0 pixels by teacher prediction and entropy bin.

    See the module docstring. ``num_classes`` is K_total (required for ``entropy="plop"``).
    """
    check_entropy_histogram_args(teacher_masks, labels, num_bins, num_classes, entropy)
    num_old = teacher_masks.shape[1]
    prediction, values = teacher_prediction(teacher_masks, tuple(labels.shape[1:]), entropy, num_classes)
    background = labels == 0
    flat_index = prediction * num_bins + entropy_bins(values, num_bins)
    # Non-background pixels go to a spare last slot that is dropped: no boolean indexing, no host sync.
    flat_index = torch.where(background, flat_index, num_old * num_bins)
    counts = torch.zeros(num_old * num_bins + 1, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(0, flat_index.reshape(-1), torch.ones_like(flat_index.reshape(-1)))
    return counts[:-1].reshape(num_old, num_bins)


def _plop_median(histogram: torch.Tensor) -> torch.Tensor:
    """(K_old,) float32: PLOP's ``find_median`` search, vectorised over classes and bins (quirks in the doc).

    PLOP loops over i = 0 … num_bins − 1 with Python floats lower = i / num_bins, bin = int(lower·num_bins)
    and a running sum S that grows by lower·num_bins; it stops at the first i with half ≥ S and half ≤ S +
    n_bin, both compared in float32 (torch casts the Python float to the tensor's dtype). The Python-float
    sequences are computed here exactly as there, then every comparison and the final formula in float32.
    """
    num_bins = histogram.shape[1]
    device = histogram.device
    lower = [i / num_bins for i in range(num_bins)]
    read_bin = [int(value * num_bins) for value in lower]
    running = [0.0]  # running[i]: S at the start of iteration i; running[num_bins]: after the last one
    for value in lower:
        running.append(running[-1] + value * num_bins)
    f32 = torch.float32
    lower_t = torch.tensor(lower, dtype=f32, device=device)
    running_t = torch.tensor(running, dtype=f32, device=device)
    counts = histogram[:, torch.tensor(read_bin, device=device)].to(f32)  # (K_old, num_bins): n_bin(i)
    total = histogram.sum(1)
    half = total.to(f32) / 2
    inside = (half[:, None] >= running_t[:-1]) & (half[:, None] <= running_t[:-1] + counts)
    found = inside.any(1)
    stop = torch.where(found, inside.to(torch.int8).argmax(1), num_bins - 1)
    running_at_stop = torch.where(found, running_t[stop], running_t[num_bins])
    count_at_stop = counts.gather(1, stop[:, None])[:, 0]
    median = lower_t[stop] + ((half - running_at_stop) / count_at_stop) * (1 / num_bins)
    return torch.where(total > 0, median, 0.0)


def _interpolated_median(histogram: torch.Tensor) -> torch.Tensor:
    """(K_old,) float32 histogram medians with the correct cumulative count (``median="interpolated"``)."""
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
    return torch.where(total.squeeze(1) > 0, median, 0.0).to(torch.float32)


@torch.no_grad()
def plop_thresholds(histogram: torch.Tensor, floor: float = 0.001, *, median: str = "plop") -> torch.Tensor:
    """(K_old,) float32 per-class entropy thresholds: each row's median (``median`` picks PLOP's search or the
    interpolated median, see the module docstring), then max(median, floor) as PLOP's ``max``."""
    check_plop_thresholds_args(histogram, floor, median)
    medians = _plop_median(histogram) if median == "plop" else _interpolated_median(histogram)
    # Python's max(threshold, floor) in PLOP: floor only where threshold < floor (a NaN stays NaN).
    return torch.where(medians < floor, floor, medians)


def pseudo_label_counts(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int,
    num_classes: int | None = None,
    entropy: str = "plop",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels (B, H, W) int64, counts (B, 2) int64 = (#label-0 pixels, #pseudo-labelled)) per image."""
    acc = compute_dtype(teacher_masks.dtype)
    prediction, values = teacher_prediction(teacher_masks, tuple(labels.shape[1:]), entropy, num_classes)
    labels = labels.long()
    background = labels == 0
    confident = background & (values < thresholds.to(acc)[prediction])
    pseudo = torch.where(background, torch.where(confident, prediction, ignore_index), labels)
    return pseudo, torch.stack([background.sum((1, 2)), confident.sum((1, 2))], dim=1)


def image_factor(counts: torch.Tensor, dtype: torch.dtype, min_image_factor: float) -> torch.Tensor:
    """PLOP's per-image factor from pseudo_label_counts: n_pseudo / (n_background + 1e-6), clamped below."""
    num_background = counts[:, 0].to(dtype)
    num_confident = counts[:, 1].to(dtype)
    return (num_confident / (num_background + IMAGE_FACTOR_EPS)).clamp_min(min_image_factor)


@torch.no_grad()
def pseudo_label(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int = 255,
    min_image_factor: float = 0.0,
    *,
    num_classes: int | None = None,
    entropy: str = "plop",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels (B, H, W) int64, per-image factor (B,)) by PLOP's entropy rule; see the module docstring.

    The factor is float32 (float64 for float64 teacher_masks). ``num_classes`` is K_total (required for
    ``entropy="plop"``).
    """
    check_pseudo_label_args(teacher_masks, labels, thresholds, ignore_index, min_image_factor, num_classes, entropy)
    pseudo, counts = pseudo_label_counts(teacher_masks, labels, thresholds, ignore_index, num_classes, entropy)
    return pseudo, image_factor(counts, compute_dtype(teacher_masks.dtype), min_image_factor)
