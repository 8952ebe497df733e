"""Plain-PyTorch reference of MiB's two losses from patch-resolution masks: the spec of ``mib_head_loss``.

MiB (Cermelli et al., CVPR 2020; released code fcdl94/MiB, ``utils/loss.py``) trains a segmentation model
whose background class absorbs every class that is not annotated in the current step:

* ``UnbiasedCrossEntropy(old_cl=num_old, reduction="mean", ignore_index)``: the probability of the label
  "background" is the mass of the background *and every old class*, p(O) = Σ_{c < num_old} p_c, and the
  labels of old classes count as background (old classes never appear in a step's labels, but MiB maps any
  label < num_old to 0 "just to be sure"). Per counted pixel

      CE = lse(z) − lse(z_0, …, z_{num_old−1})   for a label < num_old,
      CE = lse(z) − z_y                           for a label y ≥ num_old,

  and ``unce`` is the mean over the counted pixels (``F.nll_loss``'s mean).
* ``UnbiasedKnowledgeDistillationLoss(alpha=kd_alpha, reduction="mean")``: the previous step's model
  (``teacher_masks``, its K_old = num_old classes) is distilled into the student with the *new* classes
  merged into the student's background: with q = softmax(α·t) over the teacher's classes,

      kd = (q_0·(lse(z_0, z_{num_old}, …, z_{K−1}) − lse(z)) + Σ_{1 ≤ c < num_old} q_c·(z_c − lse(z))) / num_old

  per pixel (MiB's "average on the classes", a division by the teacher's class count) and ``unkd`` is
  −mean over every pixel of the batch (MiB passes no mask).

Both are evaluated, as MiB evaluates them, on full-resolution logits: here z and t are the bilinear
(align_corners=False) upsampling of ``masks`` (B, K, h, w) and ``teacher_masks`` (B, num_old, h, w) to the
labels' (H, W) — the (B, K, H, W) tensor that ``incrementer_fast.mib_head_loss``'s kernels never build.
Computed in float32 (float64 for float64 masks); the teacher is not differentiated (MiB computes it under
``torch.no_grad``).

Where this departs from MiB's code, and why (also in docs/fidelity.md):

* A label outside [0, K) counts as ``ignore_index``, as in every op of this package. MiB's ``nll_loss``
  raises for a label ≥ K and, after ``labels[targets < old_cl] = 0``, counts a negative label as
  background.
* ``unce`` is 0 (with zero gradients) when no pixel of the batch is counted; MiB's mean is then 0/0 = NaN,
  which would turn every weight into NaN at the next step of the optimiser.
* ``unkd`` of an empty batch is 0 (MiB's ``torch.mean`` of nothing is NaN).
"""
from __future__ import annotations

import torch

from .._checks import check_mib_head_loss_args
from .seg_head import labels_in_range, upsample_logits


def mib_head_loss(
    masks: torch.Tensor,
    labels: torch.Tensor,
    num_old: int,
    teacher_masks: torch.Tensor | None = None,
    kd_alpha: float = 1.0,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unce, unkd) of patch-resolution masks (B, K, h, w) against labels (B, H, W); see the module docstring.

    Args:
        masks: (B, K, h, w) student logits at patch resolution, any float dtype; differentiable.
        labels: (B, H, W) integer labels of the step (background 0, new classes ≥ num_old).
        num_old: classes [0, num_old) are the background and the old classes (1 ≤ num_old < K).
        teacher_masks: (B, num_old, h, w) logits of the previous step's model, or None (then unkd = 0).
        kd_alpha: MiB's ``alpha``: the teacher's logits are multiplied by it before the softmax.
        ignore_index: label of pixels left out of the CE.

    Returns:
        (unce, unkd), 0-dim float32 (float64 for float64 masks).
    """
    check_mib_head_loss_args(masks, labels, num_old, teacher_masks, kd_alpha, ignore_index)
    num_classes = masks.shape[1]
    size = tuple(labels.shape[1:])
    # contiguous: the CPU backward of a channels_last upsampling rejects the gradient the gathers give it
    logits = upsample_logits(masks.contiguous(), size)
    den = torch.logsumexp(logits, dim=1)
    target = labels_in_range(labels, num_classes, ignore_index)
    counted = target != ignore_index
    old_label = counted & (target < num_old)
    label_logit = logits.gather(1, torch.where(counted, target, 0)[:, None])[:, 0]
    target_log_mass = torch.where(old_label, torch.logsumexp(logits[:, :num_old], dim=1), label_logit)
    pixel_ce = torch.where(counted, den - target_log_mass, 0.0)
    unce = pixel_ce.sum() / counted.sum().clamp_min(1)
    if teacher_masks is None:
        return unce, logits.new_zeros(())
    teacher_probs = torch.softmax(upsample_logits(teacher_masks.detach(), size) * kd_alpha, dim=1)
    background_log_mass = torch.logsumexp(torch.cat([logits[:, :1], logits[:, num_old:]], dim=1), dim=1)
    pixel_kd = (teacher_probs[:, 0] * (background_log_mass - den)
                + (teacher_probs[:, 1:] * (logits[:, 1:num_old] - den[:, None])).sum(1)) / num_old
    unkd = -(pixel_kd.sum() / max(pixel_kd.numel(), 1))
    return unce, unkd
