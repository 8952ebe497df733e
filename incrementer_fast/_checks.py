"""Argument validation shared by the public ops and the reference.

Every check the ops run reads only shapes, dtypes and devices: no host synchronisation is ever added to
validate. Errors name the argument and the shapes involved. The one exception is the opt-in
:func:`check_labels` (exported as ``incrementer_fast.check_labels``), which reads label values.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype} with shape {_shape(t)}"
        )


def check_integer(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype} with shape {_shape(t)}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {_shape(t)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_ignore_index(labels: torch.Tensor, ignore_index) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        # A value the labels cannot hold would silently wrap (uint8 labels and ignore_index=-1 → 255).
        raise ValueError(
            f"ignore_index={ignore_index} cannot be stored in labels of dtype {labels.dtype} "
            f"(range [{info.min}, {info.max}])"
        )


def check_cosine_mask_args(patches, classes, scale, eps, out_dtype=None) -> None:
    check_float("patches", patches)
    check_float("classes", classes)
    check_ndim("patches", patches, 3, "(B, N, D)")
    check_ndim("classes", classes, 3, "(B, K, D)")
    if patches.dtype != classes.dtype:
        raise TypeError(f"patches ({patches.dtype}) and classes ({classes.dtype}) must have one dtype")
    pb, _, pd = patches.shape
    cb, _, cd = classes.shape
    if pb != cb or pd != cd:
        raise ValueError(
            f"patches (B, N, D) = {_shape(patches)} and classes (B, K, D) = {_shape(classes)} "
            "must agree in B and D"
        )
    if isinstance(scale, torch.Tensor):
        check_float("scale", scale)
        if scale.dim() != 0:
            raise ValueError(f"scale must be a Python float or a 0-dim tensor, got shape {_shape(scale)}")
        check_same_device(patches=patches, classes=classes, scale=scale)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float or a 0-dim tensor, got {type(scale).__name__}")
    else:
        # A tensor scale is not read (that would sync with the device); a float is: NaN or ±inf would
        # make every mask NaN.
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float, got {scale!r}")
        check_same_device(patches=patches, classes=classes)
    _check_eps(eps)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"out_dtype must be None or one of float16, bfloat16, float32, float64, got {out_dtype!r}"
        )


def _check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


def _check_non_negative(name: str, value) -> None:
    """A finite float ≥ 0 (NaN and inf refused: they turn the loss into NaN)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a non-negative finite float, got {value!r}")


def check_fod_loss_args(student, teacher, weight, eps) -> None:
    check_float("student", student)
    check_float("teacher", teacher)
    check_float("weight", weight)
    if student.dim() < 1:
        raise ValueError(f"student must have shape (..., D), got shape {_shape(student)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {_shape(student)} and teacher {_shape(teacher)} must have the same shape (..., D)"
        )
    if weight.shape != student.shape[:-1]:
        raise ValueError(
            f"weight must have shape (...) = {_shape(student)[:-1]}, one weight per vector of "
            f"student {_shape(student)}, got {_shape(weight)}"
        )
    check_same_device(student=student, teacher=teacher, weight=weight)
    _check_eps(eps)


def check_fod_token_weights_args(labels, num_old, patch_size, bg_weight, ignore_index) -> None:
    check_integer("labels", labels)
    check_ndim("labels", labels, 3, "(B, H, W)")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    _, h, w = labels.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"labels (B, H, W) = {_shape(labels)}: H and W must be multiples of patch_size={patch_size}"
        )
    if not isinstance(num_old, int) or num_old < 1:
        raise ValueError(f"num_old must be an int >= 1, got {num_old!r}")
    _check_non_negative("bg_weight", bg_weight)  # the weights feed fod_loss's weighted mean
    check_ignore_index(labels, ignore_index)


def check_cds_dice_args(logits, labels, num_old, ignore_index, smooth) -> None:
    check_float("logits", logits)
    check_integer("labels", labels)
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (B, C, *spatial), got shape {_shape(logits)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"labels must have shape (B, *spatial) = {expected} for logits (B, C, *spatial) = "
            f"{_shape(logits)}, got {_shape(labels)}"
        )
    num_classes = logits.shape[1]
    if not isinstance(num_old, int) or not 1 <= num_old < num_classes:
        raise ValueError(
            f"num_old must be an int in [1, C) with C = {num_classes} (logits {_shape(logits)}), got {num_old!r}"
        )
    check_ignore_index(labels, ignore_index)
    _check_non_negative("smooth", smooth)
    check_same_device(logits=logits, labels=labels)


# ------------------------------------------------------------------- seg_head_loss and PLOP's pseudo-labels
ENTROPIES = ("plop", "normalized")
MEDIANS = ("plop", "interpolated")


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _check_number(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


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
    if labels.shape[1] == 0 or labels.shape[2] == 0:  # the masks cannot be upsampled to no pixels
        raise ValueError(f"labels (B, H, W) = {_shape(labels)} must have H, W >= 1")
    check_same_device(**{masks_name: masks, "labels": labels})


def _check_num_old(num_old, masks) -> None:
    """``num_old`` of the seg-head ops: an int in [1, K) for masks (B, K, h, w)."""
    _check_int("num_old", num_old)
    if not 1 <= num_old < masks.shape[1]:
        raise ValueError(
            f"num_old must be an int in [1, K) with K = {masks.shape[1]} (masks {_shape(masks)}), got {num_old!r}"
        )

def check_seg_head_loss_args(
    masks, labels, num_old, new_class_weight, ignore_index, smooth, image_weight, dice_labels=None
) -> None:
    """Shape/dtype/argument validation of ``seg_head_loss`` (no host synchronisation)."""
    _check_masks_labels("masks", masks, labels)
    _check_num_old(num_old, masks)
    _check_non_negative("new_class_weight", new_class_weight)
    check_ignore_index(labels, ignore_index)
    _check_non_negative("smooth", smooth)
    if image_weight is not None:
        check_float("image_weight", image_weight)
        if tuple(image_weight.shape) != (masks.shape[0],):
            raise ValueError(
                f"image_weight must have shape (B,) = ({masks.shape[0]},) for masks (B, K, h, w) = "
                f"{_shape(masks)}, got {_shape(image_weight)}"
            )
        check_same_device(masks=masks, image_weight=image_weight)
    if dice_labels is not None:
        check_integer("dice_labels", dice_labels)
        if dice_labels.shape != labels.shape:
            raise ValueError(
                f"dice_labels must have the shape of labels (B, H, W) = {_shape(labels)}, got {_shape(dice_labels)}"
            )
        check_ignore_index(dice_labels, ignore_index)
        check_same_device(masks=masks, dice_labels=dice_labels)


def _check_entropy_args(teacher_masks, num_classes, entropy) -> None:
    _check_choice("entropy", entropy, ENTROPIES)
    if entropy == "plop":
        num_old = teacher_masks.shape[1]
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < num_old:
            raise ValueError(
                f"num_classes must be an int >= K_old = {num_old} (teacher_masks {_shape(teacher_masks)}) for "
                f"entropy='plop': the current step's class count K_total, by whose log PLOP divides its "
                f"entropy; got {num_classes!r}"
            )


def check_entropy_histogram_args(teacher_masks, labels, num_bins, num_classes=None, entropy="plop") -> None:
    _check_masks_labels("teacher_masks", teacher_masks, labels)
    if teacher_masks.shape[1] < 2:
        raise ValueError(f"teacher_masks (B, K_old, h, w) = {_shape(teacher_masks)} must have K_old >= 2")
    _check_int("num_bins", num_bins)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    _check_entropy_args(teacher_masks, num_classes, entropy)


def check_pseudo_label_args(
    teacher_masks, labels, thresholds, ignore_index, min_image_factor, num_classes=None, entropy="plop"
) -> None:
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
    check_ignore_index(labels, ignore_index)
    _check_number("min_image_factor", min_image_factor)
    _check_entropy_args(teacher_masks, num_classes, entropy)


def check_plop_thresholds_args(histogram, floor, median="plop") -> None:
    check_integer("histogram", histogram)
    check_ndim("histogram", histogram, 2, "(K_old, num_bins)")
    if histogram.shape[1] < 1:
        raise ValueError(f"histogram (K_old, num_bins) = {_shape(histogram)} must have num_bins >= 1")
    _check_number("floor", floor)
    _check_choice("median", median, MEDIANS)


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> None:
    """Raise a ValueError naming every label value outside [0, num_classes) that is not ``ignore_index``.

    The ops give such values one defined meaning (the losses treat them as ``ignore_index``, see each op's
    docstring) and never check them, because a check of the values needs the host to wait for the device.
    Call this yourself, e.g. once per batch while setting a pipeline up, when a bad label should stop you.

    Args:
        labels: an integer tensor of any shape (any device).
        num_classes: the number of classes C; valid labels are 0 … C − 1.
        ignore_index: the label value of ignored pixels, also accepted.

    Raises:
        ValueError: naming up to 10 offending values with their counts, the total, and the labels' shape.
        TypeError: for non-integer labels or a non-int ``num_classes``.

    Examples:
        >>> check_labels(torch.tensor([[0, 3, 255]]), num_classes=4)   # fine
        >>> check_labels(torch.tensor([[0, 7, -1]]), num_classes=4)
        Traceback (most recent call last):
        ...
        ValueError: labels (1, 3) hold 2 values outside [0, 4) that are not ignore_index=255: -1 (1×), 7 (1×)
    """
    check_integer("labels", labels)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise TypeError(f"num_classes must be a positive int, got {num_classes!r}")
    check_ignore_index(labels, ignore_index)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if not bool(bad.any()):  # the one host synchronisation, in the common case
        return
    values, counts = torch.unique(labels[bad], return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    listed = ", ".join(f"{v} ({c}×)" for v, c in zip(values[:10], counts[:10]))
    more = f", and {len(values) - 10} more distinct values" if len(values) > 10 else ""
    raise ValueError(
        f"labels {_shape(labels)} hold {sum(counts)} values outside [0, {num_classes}) that are not "
        f"ignore_index={ignore_index}: {listed}{more}"
    )


def check_mib_head_loss_args(masks, labels, num_old, teacher_masks, kd_alpha, ignore_index) -> None:
    """Shapes, dtypes and arguments of ``mib_head_loss``; errors name the argument and what to pass."""
    _check_masks_labels("masks", masks, labels)
    _check_num_old(num_old, masks)
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
