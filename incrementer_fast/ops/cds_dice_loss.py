"""cds_dice_loss: the public function, and the Triton path as the custom ops `incrementer_fast::cds_dice_loss`
and `incrementer_fast::cds_dice_loss_backward`.

``cds_dice_loss`` picks the implementation (``incrementer_fast._dispatch.backend``) before the autograd
boundary: the plain-PyTorch reference (``incrementer_fast.reference.cds_dice_loss``, differentiated by
autograd) or the kernels of `incrementer_fast.kernels.cds_dice_loss`. The forward op returns the loss and the
per-image sums stats (6, B) = [I_new, Q_new, T_new, I_old, Q_old, T_old] (see kernels/cds_dice_loss.py); the
backward needs only those sums, the logits and the labels, so no (B, C, *spatial) intermediate is kept
between forward and backward.
"""
from __future__ import annotations

import torch

from .._checks import check_cds_dice_args
from .._dispatch import HAS_TRITON, backend, check_kernels_run
from ..reference.core import cds_dice_loss as reference_cds_dice_loss
from ..reference.core import compute_dtype

if HAS_TRITON:
    from ..kernels import cds_dice_loss as kernels

__all__ = ["cds_dice_loss"]


@torch.library.custom_op("incrementer_fast::cds_dice_loss", mutates_args=())
def _cds_dice_loss_fwd_op(
    logits: torch.Tensor, labels: torch.Tensor, num_old: int, ignore_index: int, smooth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check_kernels_run(logits.device)
    return kernels.cds_dice_loss_forward(logits, labels, num_old, ignore_index, smooth)


@_cds_dice_loss_fwd_op.register_fake
def _(logits, labels, num_old, ignore_index, smooth):
    acc = compute_dtype(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty((kernels.NUM_STATS, logits.shape[0]), dtype=acc)


@torch.library.custom_op("incrementer_fast::cds_dice_loss_backward", mutates_args=())
def _cds_dice_loss_bwd_op(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    num_old: int,
    ignore_index: int,
    smooth: float,
) -> torch.Tensor:
    return kernels.cds_dice_loss_backward(grad_loss, logits, labels, stats, num_old, ignore_index, smooth)


@_cds_dice_loss_bwd_op.register_fake
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
    grad_logits = _cds_dice_loss_bwd_op(
        grad_loss, logits, labels, stats, ctx.num_old, ctx.ignore_index, ctx.smooth
    )
    return grad_logits, None, None, None, None


_cds_dice_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
    if backend(logits.device) == "reference":
        return reference_cds_dice_loss(logits, labels, num_old, ignore_index, smooth)
    loss, _ = _cds_dice_loss_fwd_op(logits, labels, num_old, ignore_index, float(smooth))
    return loss
