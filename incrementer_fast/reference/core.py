"""Plain-PyTorch references of the core ops: the specification the kernels are tested against.

Notation: x̂ = x / max(‖x‖₂, eps), norms over the last dimension. Everything is computed in float32
(float64 when the inputs are float64, so that the reference can be evaluated exactly in tests).
"""
from __future__ import annotations

import math

import torch

from .._checks import (
    check_cds_dice_args,
    check_cosine_mask_args,
    check_fod_loss_args,
    check_fod_token_weights_args,
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def cosine_mask(
    patches: torch.Tensor, classes: torch.Tensor, scale=1.0, eps: float = 1e-8, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """masks[b, k, n] = scale · ⟨p̂[b, n], ĉ[b, k]⟩ for patches (B, N, D), classes (B, K, D) → (B, K, N).

    Computed in the compute dtype and rounded once to ``out_dtype`` (default: the inputs' dtype), also under
    autocast (which would otherwise run the bmm in bf16/fp16 and round every logit before ``out_dtype``).
    """
    check_cosine_mask_args(patches, classes, scale, eps, out_dtype)
    acc = compute_dtype(patches.dtype)
    p = _normalize(patches.to(acc), eps)
    c = _normalize(classes.to(acc), eps)
    with torch.autocast(p.device.type, enabled=False):
        masks = torch.bmm(c, p.transpose(1, 2))
    if isinstance(scale, torch.Tensor):
        masks = masks * scale.to(acc)
    else:
        masks = masks * scale
    return masks.to(out_dtype or patches.dtype).contiguous()


def fod_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Σ_i w_i·(1 − ⟨ŝ_i, t̂_i⟩) / Σ_i w_i over the vectors i of student/teacher (..., D); 0 when Σ w = 0.

    Negative weights count as 0 (w_i = max(w_i, 0)): a weighted mean needs non-negative weights, and with
    weights of both signs Σ w can cancel to almost 0 and blow the loss up (1.4e6 from +1, −0.999999).
    Clamping is checked on the device, so it costs no host synchronisation (a ValueError would need one);
    FOD's own weights (`fod_token_weights`) are never negative. A NaN weight makes the loss NaN (on both
    paths), so the trainer's non-finite-loss guard sees it.
    """
    check_fod_loss_args(student, teacher, weight, eps)
    acc = compute_dtype(student.dtype)
    s = _normalize(student.to(acc), eps)
    t = _normalize(teacher.to(acc), eps)
    w = weight.detach().to(acc).clamp_min(0.0)
    cos = (s * t).sum(-1)
    numerator = (w * (1.0 - cos)).sum()
    denominator = w.sum()
    nonzero = denominator != 0
    # where() on both sides: the unused branch must not produce NaN gradients when Σ w = 0.
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1.0), 0.0)


def fod_token_weights(
    labels: torch.Tensor, num_old: int, patch_size: int, bg_weight: float, ignore_index: int = 255
) -> torch.Tensor:
    """Per-patch FOD weights (B, N) from image-resolution labels (B, H, W), patches in row-major order.

    0 for a patch holding any new-class pixel (num_old ≤ label ≠ ignore_index); otherwise the mean over its
    pixels of 1 (old class: 1 ≤ label < num_old) or bg_weight (background 0, or ignore_index).
    """
    check_fod_token_weights_args(labels, num_old, patch_size, bg_weight, ignore_index)
    b, h, w = labels.shape
    p = patch_size
    tiles = labels.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, (h // p) * (w // p), p * p)
    not_ignored = tiles != ignore_index
    is_new = not_ignored & (tiles >= num_old)
    is_old = not_ignored & (tiles >= 1) & (tiles < num_old)
    per_pixel = torch.where(is_old, 1.0, float(bg_weight))
    weights = per_pixel.mean(-1)
    return torch.where(is_new.any(-1), 0.0, weights)


def cds_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_old: int, ignore_index: int = 255, smooth: float = 1.0
) -> torch.Tensor:
    """CDS old/new dice loss of logits (B, C, *spatial) against labels (B, *spatial); float32 0-dim.

    P = softmax over C; P_new = Σ_{c ≥ num_old} P_c, P_old = Σ_{c < num_old} P_c; over each image's valid
    pixels, dice(P, M) = 1 − (2·Σ P·M + smooth) / (Σ P + Σ M + smooth); loss = mean over the batch of
    dice(P_new, M_new) + dice(P_old, M_old), and 0 for a batch of no image.

    Valid pixels: label ≠ ignore_index and 0 ≤ label < C. A label outside [0, C) is treated as
    ignore_index (it belongs to no class the logits score); `incrementer_fast.check_labels` raises on such
    labels for users who want an error instead (it costs a host synchronisation, hence opt-in).
    """
    check_cds_dice_args(logits, labels, num_old, ignore_index, smooth)
    acc = compute_dtype(logits.dtype)
    batch = logits.shape[0]
    probs = torch.softmax(logits.to(acc), dim=1)
    pixels = math.prod(labels.shape[1:])  # explicit: a batch of 0 leaves -1 undetermined
    p_new = probs[:, num_old:].sum(1).reshape(batch, pixels)
    p_old = probs[:, :num_old].sum(1).reshape(batch, pixels)
    flat_labels = labels.reshape(batch, pixels)
    num_classes = logits.shape[1]
    valid = ((flat_labels != ignore_index) & (flat_labels >= 0) & (flat_labels < num_classes)).to(acc)
    m_new = valid * (flat_labels >= num_old).to(acc)
    m_old = valid * (flat_labels < num_old).to(acc)
    p = torch.stack([p_new, p_old])  # (2, B, S): rows new, old
    m = torch.stack([m_new, m_old])
    return dice_from_sums((p * m).sum(2), (p * valid).sum(2), m.sum(2), smooth)


def dice_from_sums(intersection: torch.Tensor, probability: torch.Tensor, count: torch.Tensor,
                   smooth: float) -> torch.Tensor:
    """CDS's dice from per-image sums, each (2, B) with rows (new, old): the sum over both rows and the B
    images of 1 − (2·Σ P·M + smooth) / (Σ P + Σ M + smooth), divided by B (0 for B = 0). An image without
    valid pixels has dice 0 for every smooth ≥ 0: with smooth > 0 the formula gives 0, and with smooth = 0
    the 0/0 is taken at that value (and gives no gradient) rather than NaN.

    The one place this formula lives: ``cds_dice_loss`` here, and the kernel path of ``seg_head_loss``
    (``incrementer_fast.ops.seg_head``, on the kernels' sums), which autograd differentiates.
    """
    denominator = probability + count + smooth
    empty = denominator == 0
    dice = torch.where(empty, 0.0, 1.0 - (2.0 * intersection + smooth) / torch.where(empty, 1.0, denominator))
    return dice.sum() / max(dice.shape[-1], 1)
