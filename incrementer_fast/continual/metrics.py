"""Dataset-level segmentation metrics: a confusion matrix, per-class IoU and the old/new/all mIoU of
class-incremental segmentation, as MiB, PLOP and Incrementer report them.

The confusion matrix counts pixels over the whole evaluation set (rows: ground truth, columns:
prediction; pixels whose ground truth is the ignore index are skipped), and IoU is computed once from
the totals, never averaged over images: the convention of MiB, PLOP and SSUL (their
``StreamSegMetrics``). Under DDP each process counts its shard and ``all_reduce`` sums the matrices, so
the result does not depend on the number of processes. (Hand-written on purpose rather than a metrics
library's IoU: the rule of which classes enter a mean, below, must be MiB's and PLOP's exactly, and the one
matrix serves the DDP reduction and every old/new split.)

Which classes enter a mean: the classes with ground-truth pixels in the evaluated set. MiB's and PLOP's
``StreamSegMetrics.get_results`` (fcdl94/MiB and arthurdouillard/CVPR2021_PLOP,
``metrics/stream_metrics.py``) mask the IoU vector with ``gt_sum != 0`` before ``np.mean`` and report
"X" for the other classes; so a class absent from the ground truth is left out even when it is
predicted (it is not scored 0), and a class present in the ground truth but never predicted right scores
0. Their IoU adds ``EPS = 1e-6`` to the denominator; ours does not (for a class with ground truth the
denominator is at least 1 pixel, so the two differ by less than 1e-6 relative).

The old / new / all split is the papers' ("0-15 | 16-20 | all" for VOC 15-1 in MiB, PLOP, Incrementer),
at every step: ``miou_old`` over the step-0 classes (the background included), ``miou_new`` over every
class added after step 0 and seen so far, ``miou_all`` over all classes seen so far. The split at the
current step is kept as ``miou_prev`` (classes before the step) and ``miou_step`` (the step's classes).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Pixel counts ``mat[gt, pred]`` (int64) over an evaluation set of ``num_classes`` classes."""

    def __init__(self, num_classes: int, device=None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> None:
        """Add the pixels of a batch. ``pred`` and ``target`` are integer tensors of the same shape (any
        layout, e.g. (B, H, W)); pixels whose target is ``ignore_index`` are skipped. A value outside
        ``0..num_classes-1`` (other than the ignored target) raises ValueError: counting it in a wrong
        cell would corrupt every IoU silently."""
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("pred and target must be torch tensors")
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(f"pred and target must be integer tensors, got {pred.dtype} and {target.dtype}")
        n = self.num_classes
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
        if target.numel() == 0:
            return
        lo = torch.minimum(target.min(), pred.min())
        hi = torch.maximum(target.max(), pred.max())
        lo, hi = int(lo), int(hi)  # one host sync per batch; evaluation only
        if lo < 0 or hi >= n:
            raise ValueError(
                f"pred/target values must lie in 0..{n - 1} (target {ignore_index} is ignored), "
                f"got values in {lo}..{hi}"
            )
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrices of all processes when torch.distributed is initialised (in place)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU = TP / (TP + FP + FN) as float64 on the CPU; NaN for a class without
        ground-truth pixels (MiB/PLOP's "X": it enters no mean, even if it was predicted)."""
        return iou_from_matrix(self.mat)



def iou_from_matrix(mat: torch.Tensor) -> torch.Tensor:
    """Per-class IoU of an (N, N) count matrix ``mat[gt, pred]`` as float64 on the CPU; NaN for a class
    whose row is empty (no ground-truth pixel), as MiB/PLOP's ``gt_sum != 0`` mask."""
    mat = mat.detach().to("cpu", torch.float64)
    tp = mat.diagonal()
    ground_truth = mat.sum(1)
    union = ground_truth + mat.sum(0) - tp
    return torch.where(ground_truth > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def mean_iou(per_class_iou: Sequence[float | None], classes: Iterable[int]) -> float | None:
    """Mean of ``per_class_iou[c]`` over ``classes``, leaving out the classes without ground truth
    (``None`` or NaN there); ``None`` when no class is left. ``per_class_iou`` is a record's list (or
    ``ConfusionMatrix.iou().tolist()``)."""
    values = []
    for c in classes:
        value = per_class_iou[c]
        if value is not None and not math.isnan(value):
            values.append(value)
    return sum(values) / len(values) if values else None


def _check_task(task, step: int, n: int) -> list[list[int]]:
    steps = [[int(c) for c in classes] for classes in task]
    if not steps or not isinstance(step, int) or not 0 <= step < len(steps):
        raise ValueError(f"step {step!r} is out of range for a task of {len(steps)} steps")
    seen = [c for classes in steps[: step + 1] for c in classes]
    if len(set(seen)) != len(seen):
        raise ValueError(f"the steps of the task {task!r} overlap")
    if any(not 0 <= c < n for c in seen):
        raise ValueError(f"classes {sorted(seen)} out of range for a {n}x{n} confusion matrix")
    return steps


def summarize(cm, task: Sequence[Sequence[int]], step: int) -> dict:
    """Step metrics from a confusion matrix (a ``ConfusionMatrix`` or an (N, N) tensor of counts).

    ``task`` lists the classes of each step (step 0 holds the background), ``step`` is the step just
    trained. With base = the step-0 classes, added = the classes of steps 1..``step``, current = the
    classes of ``step`` and previous = the classes of the steps before it, returns:

    - ``miou_old``, ``miou_new``, ``miou_all``: mean IoU over base (background included), added
      (``None`` at step 0) and both, the columns of the papers' tables; fractions in [0, 1].
    - ``miou_prev``, ``miou_step``: mean IoU over previous (``None`` at step 0) and current: the split
      of the step itself (at the last step of a one-class-per-step task, ``miou_step`` is the IoU of the
      last class alone).
    - ``per_class_iou``: the IoU of each seen class, indexed by class (classes are 0..K in label order),
      ``None`` (JSON ``null``) for a class without ground-truth pixels.
      Every mean leaves out the ``None`` classes (see the module docstring); a mean over no class is
      ``None``.
    - ``chance_miou_new``: the ``miou_new`` of a constant prediction: the mean over the added classes
      with ground truth of their share of the evaluated pixels (predicting class c everywhere gives
      IoU = share of c; no constant guess does better). ``None`` at step 0.
    - ``new_fp_rate``: for the classes of this step taken together, the false-positive rate on the
      pixels of the earlier classes (background included): among those pixels, the fraction predicted
      as any class of this step. It measures how far the step's classes eat into the old ones, the
      failure that background shift and missing distillation cause. ``None`` at step 0 or without
      such pixels.
    - ``new_fdr``: the false-discovery rate of this step's classes: among the pixels predicted as one
      of them, the fraction whose ground truth is not that class (1 - pooled precision). ``None`` at step
      0 or when nothing is predicted as one of them.
    - ``pixel_acc``: the fraction of evaluated pixels predicted correctly.

    Examples:
        >>> matrix = ConfusionMatrix(3)   # VOC-like task [[0, 1], [2]] after step 1
        >>> matrix.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2]))
        >>> summarize(matrix, [[0, 1], [2]], 1)["miou_new"]
        1.0
    """
    mat = cm.mat if isinstance(cm, ConfusionMatrix) else cm
    mat = mat.detach().to("cpu", torch.int64)
    if mat.dim() != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"confusion matrix must be square (N, N), got {tuple(mat.shape)}")
    steps = _check_task(task, step, mat.shape[0])
    base = steps[0]
    added = [c for classes in steps[1: step + 1] for c in classes]
    previous = [c for classes in steps[:step] for c in classes]
    current = steps[step]
    seen = sorted(base + added)

    iou = iou_from_matrix(mat).tolist()
    per_class = [None if math.isnan(iou[c]) else iou[c] for c in range(seen[-1] + 1)]
    ground_truth = mat.sum(1)
    total = int(mat.sum())

    chance = None
    if added and total:
        chance = mean_iou([int(ground_truth[c]) / total if ground_truth[c] else None
                           for c in range(mat.shape[0])], added)
    new_fp_rate = None
    if previous:
        negatives = int(mat[previous].sum())
        if negatives > 0:
            new_fp_rate = int(mat[previous][:, current].sum()) / negatives
    new_fdr = None
    predicted_current = int(mat[:, current].sum())
    if step > 0 and predicted_current > 0:
        new_fdr = 1.0 - int(mat.diagonal()[current].sum()) / predicted_current
    return {
        "miou_old": mean_iou(iou, base),
        "miou_new": mean_iou(iou, added),
        "miou_all": mean_iou(iou, seen),
        "miou_prev": mean_iou(iou, previous),
        "miou_step": mean_iou(iou, current),
        "per_class_iou": per_class,
        "chance_miou_new": chance,
        "new_fp_rate": new_fp_rate,
        "new_fdr": new_fdr,
        "pixel_acc": int(mat.diagonal().sum()) / total if total else None,
    }
