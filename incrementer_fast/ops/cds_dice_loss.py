"""cds_dice_loss as the custom op `incrementer_fast::cds_dice_loss`, with its backward as a second custom op.

The forward op returns the loss and the per-image sums stats (6, B) = [I_new, Q_new, T_new, I_old, Q_old,
T_old] (see kernels/cds_dice_loss.py); the backward needs only those sums, the logits and the labels, so no
(B, C, *spatial) intermediate is kept between forward and backward. On the Triton backend both ops run the
kernels; otherwise they compute the same quantities with plain PyTorch (the softmax VJP written out, as in
the kernels' docstring), and the tests hold both against autograd through `reference.cds_dice_loss`.
"""
from __future__ import annotations

import math

import torch

from .._checks import check_cds_dice_args
from .._dispatch import backend
from ..reference.core import compute_dtype

__all__ = ["cds_dice_loss"]


def _probabilities(logits: torch.Tensor, num_old: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax over C as (B, C, S), and P_new, P_old as (B, S), in the compute dtype."""
    batch, num_classes = logits.shape[:2]
    pixels = math.prod(logits.shape[2:])
    probs = torch.softmax(logits.to(compute_dtype(logits.dtype)).reshape(batch, num_classes, pixels), dim=1)
    return probs, probs[:, num_old:].sum(1), probs[:, :num_old].sum(1)


def _label_masks(labels: torch.Tensor, num_old: int, num_classes: int, ignore_index: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """valid (label ≠ ignore_index and 0 ≤ label < C) and label ≥ num_old as boolean (B, S)."""
    flat = labels.reshape(labels.shape[0], math.prod(labels.shape[1:]))
    return (flat != ignore_index) & (flat >= 0) & (flat < num_classes), flat >= num_old


def _torch_stats(logits: torch.Tensor, labels: torch.Tensor, num_old: int, ignore_index: int) -> torch.Tensor:
    _, p_new, p_old = _probabilities(logits, num_old)
    valid, label_new = _label_masks(labels, num_old, logits.shape[1], ignore_index)
    mask_new = (valid & label_new).to(p_new.dtype)
    mask_old = (valid & ~label_new).to(p_new.dtype)
    valid = valid.to(p_new.dtype)
    sums = [p_new * mask_new, p_new * valid, mask_new, p_old * mask_old, p_old * valid, mask_old]
    return torch.stack([s.sum(1) for s in sums])


def _torch_loss(stats: torch.Tensor, smooth: float) -> torch.Tensor:
    inter, prob, count = stats.view(2, 3, -1).unbind(1)  # each (2, B): rows new, old
    dice = 1.0 - (2.0 * inter + smooth) / (prob + count + smooth)
    return dice.sum(0).sum() / max(stats.shape[1], 1)  # 0 for a batch of no image


def _torch_grad(grad_loss, logits, labels, stats, num_old, ignore_index, smooth) -> torch.Tensor:
    batch = logits.shape[0]
    inter, prob, count = stats.view(2, 3, batch).unbind(1)
    den = prob + count + smooth
    scale = grad_loss.to(stats.dtype) / batch
    miss = scale * (2.0 * inter + smooth) / (den * den)  # (2, B): g/B · ∂dice_k/∂P_k off the mask
    hit = miss - 2.0 * scale / den  # on the mask
    valid, label_new = _label_masks(labels, num_old, logits.shape[1], ignore_index)
    a = torch.where(label_new, hit[0, :, None], miss[0, :, None])
    b = torch.where(label_new, miss[1, :, None], hit[1, :, None])
    a_minus_b = torch.where(valid, a - b, 0.0)
    probs, p_new, p_old = _probabilities(logits, num_old)
    grad = torch.cat(
        [probs[:, :num_old] * (-p_new * a_minus_b)[:, None], probs[:, num_old:] * (p_old * a_minus_b)[:, None]],
        dim=1,
    )
    # The fake (and the Triton path) return logits' layout: match it so compiled graphs see the same strides.
    return torch.empty_like(logits).copy_(grad.view(logits.shape))


@torch.library.custom_op("incrementer_fast::cds_dice_loss", mutates_args=())
def _cds_dice_loss_op(
    logits: torch.Tensor, labels: torch.Tensor, num_old: int, ignore_index: int, smooth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend(logits.device) == "triton":
        # Imported on first use: the reference path then needs neither triton nor the kernels subpackage.
        from ..kernels.cds_dice_loss import cds_dice_loss_forward

        return cds_dice_loss_forward(logits, labels, num_old, ignore_index, smooth)
    stats = _torch_stats(logits, labels, num_old, ignore_index)
    return _torch_loss(stats, smooth), stats


@_cds_dice_loss_op.register_fake
def _(logits, labels, num_old, ignore_index, smooth):
    acc = compute_dtype(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty((6, logits.shape[0]), dtype=acc)


@torch.library.custom_op("incrementer_fast::cds_dice_loss_backward", mutates_args=())
def _cds_dice_loss_backward_op(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    num_old: int,
    ignore_index: int,
    smooth: float,
) -> torch.Tensor:
    if backend(logits.device) == "triton":
        from ..kernels.cds_dice_loss import cds_dice_loss_backward

        return cds_dice_loss_backward(grad_loss, logits, labels, stats, num_old, ignore_index, smooth)
    return _torch_grad(grad_loss, logits, labels, stats, num_old, ignore_index, smooth)


@_cds_dice_loss_backward_op.register_fake
def _(grad_loss, logits, labels, stats, num_old, ignore_index, smooth):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, labels, num_old, ignore_index, smooth = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # stats never get a gradient: no zero tensor (a fill launch) for them
    ctx.save_for_backward(logits, labels, stats)
    ctx.num_old, ctx.ignore_index, ctx.smooth = num_old, ignore_index, smooth


def _backward(ctx, grad_loss, _grad_stats):
    if grad_loss is None:
        return None, None, None, None, None
    logits, labels, stats = ctx.saved_tensors
    grad_logits = _cds_dice_loss_backward_op(
        grad_loss, logits, labels, stats, ctx.num_old, ctx.ignore_index, ctx.smooth
    )
    return grad_logits, None, None, None, None


_cds_dice_loss_op.register_autograd(_backward, setup_context=_setup_context)


def cds_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_old: int, ignore_index: int = 255, smooth: float = 1.0
) -> torch.Tensor:
    """CDS old/new dice loss of logits (B, C, *spatial) against integer labels (B, *spatial): 0-dim.

    P = softmax over C; P_new = Σ_{c ≥ num_old} P_c, P_old = Σ_{c < num_old} P_c; valid = label ≠
    ignore_index and 0 ≤ label < C, M_new = valid ∧ label ≥ num_old, M_old = valid ∧ label < num_old. Per
    image, over its valid pixels, dice(P, M) = 1 − (2·Σ P·M + smooth) / (Σ P + Σ M + smooth); the loss is
    the batch mean of dice(P_new, M_new) + dice(P_old, M_old), float32 (float64 for float64 logits), and 0
    (with an empty gradient) for a batch of no image. Requires 1 ≤ num_old < C. The gradient reaches
    logits in their dtype.

    A label outside [0, C) that is not ignore_index is treated as ignore_index, on the kernel and the
    reference path alike; `incrementer_fast.check_labels(labels, C, ignore_index)` raises a ValueError
    naming such values instead, for callers who want it (opt-in: it synchronises with the host).

    Examples:
        >>> logits, labels = torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 8, 8))
        >>> cds_dice_loss(logits, labels, num_old=3).shape
        torch.Size([])
    """
    check_cds_dice_args(logits, labels, num_old, ignore_index, smooth)
    loss, _ = _cds_dice_loss_op(logits, labels, num_old, ignore_index, float(smooth))
    return loss
