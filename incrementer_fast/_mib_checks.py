"""Argument validation of ``mib_head_loss`` (shared by the op and its reference; no host synchronisation)."""
from __future__ import annotations

import math

from ._checks import _check_int, _check_masks_labels, _check_number, _shape, check_float, check_ignore_index, \
    check_same_device


def check_mib_head_loss_args(masks, labels, num_old, teacher_masks, kd_alpha, ignore_index) -> None:
    """Shapes, dtypes and arguments of ``mib_head_loss``; errors name the argument and what to pass."""
    _check_masks_labels("masks", masks, labels)
    num_classes = masks.shape[1]
    _check_int("num_old", num_old)
    if not 1 <= num_old < num_classes:
        raise ValueError(
            f"num_old must be an int in [1, K) with K = {num_classes} (masks {_shape(masks)}), got {num_old!r}"
        )
    check_ignore_index(labels, ignore_index)
    _check_number("kd_alpha", kd_alpha)
    if not math.isfinite(kd_alpha):
        raise ValueError(f"kd_alpha must be a finite float (MiB's alpha, 1.0 by default), got {kd_alpha!r}")
    if teacher_masks is not None:
        check_float("teacher_masks", teacher_masks)
        batch, _, h, w = masks.shape
        if tuple(teacher_masks.shape) != (batch, num_old, h, w):
            raise ValueError(
                f"teacher_masks must have shape (B, num_old, h, w) = {(batch, num_old, h, w)} for masks "
                f"(B, K, h, w) = {_shape(masks)} and num_old = {num_old}: the previous step's model's masks at "
                f"the same patch resolution, got {_shape(teacher_masks)}"
            )
        check_same_device(masks=masks, teacher_masks=teacher_masks)
