"""Dataset-level segmentation metrics: a confusion matrix, per-class IoU and the old/new/all mIoU of
class-incremental segmentation.

The confusion matrix counts pixels over the whole evaluation set (rows: ground truth, columns:
prediction; pixels whose ground truth is the ignore index are skipped), and IoU is computed once from
the totals, never averaged over images: the convention of MiB, PLOP and SSUL (their
``StreamSegMetrics``). Under DDP each process counts its shard and ``all_reduce`` sums the matrices, so
the result does not depend on the number of processes.

``summarize`` reports, as MiB/PLOP/SSUL do, the mean IoU over the old classes (the background
included: it belongs to step 0), over the new classes of the step, and over all classes seen so far.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

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
        """Per-class IoU = TP / (TP + FP + FN) as float64 on the CPU; NaN for a class absent from both
        the ground truth and the predictions (0/0: no evidence either way)."""
        return iou_from_matrix(self.mat)


def iou_from_matrix(mat: torch.Tensor) -> torch.Tensor:
    mat = mat.detach().to("cpu", torch.float64)
    tp = mat.diagonal()
    denom = mat.sum(0) + mat.sum(1) - tp
    return torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, math.nan))


def _nanmean(values: Iterable[float]) -> float | None:
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else None


def summarize(cm, old_classes: Iterable[int], new_classes: Iterable[int]) -> dict:
    """Step metrics from a confusion matrix (a ``ConfusionMatrix`` or an (N, N) tensor of counts).

    ``old_classes`` are the classes learned before the step (the background among them from step 1 on;
    empty at step 0), ``new_classes`` the classes of the step. Returns:

    - ``miou_old``, ``miou_new``, ``miou_all``: mean IoU over the old classes (background included), the
      new classes, and both; fractions in [0, 1]. A class absent from both the ground truth and the
      predictions has no IoU (NaN) and is left out of every mean, as ``np.nanmean`` does in MiB/PLOP's
      ``StreamSegMetrics``; a mean over no valid class is ``None``.
    - ``per_class_iou``: the IoU of each seen class, indexed by class (classes are 0..K in label order),
      a fraction in [0, 1], ``None`` for an absent class (JSON ``null``).
    - ``new_fp_rate``: the false-positive rate of the new classes taken together: among the pixels whose
      ground truth is an old class (background included), the fraction predicted as any new class. It
      measures how far the new classes eat into the old ones, the failure that background shift and
      missing distillation cause. ``None`` at step 0 (no old class) or when no old-class pixel exists.
    - ``new_fdr``: the false-discovery rate of the new classes: among the pixels predicted as a new
      class, the fraction whose ground truth is not that class (1 - pooled precision). ``None`` when
      nothing is predicted as new.
    - ``pixel_acc``: the fraction of evaluated pixels predicted correctly.
    """
    mat = cm.mat if isinstance(cm, ConfusionMatrix) else cm
    mat = mat.detach().to("cpu", torch.int64)
    if mat.dim() != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"confusion matrix must be square (N, N), got {tuple(mat.shape)}")
    n = mat.shape[0]
    old = sorted({int(c) for c in old_classes})
    new = sorted({int(c) for c in new_classes})
    if set(old) & set(new):
        raise ValueError(f"old and new classes overlap: {sorted(set(old) & set(new))}")
    seen = sorted(old + new)
    if seen and (seen[0] < 0 or seen[-1] >= n):
        raise ValueError(f"classes {seen} out of range for a {n}x{n} confusion matrix")
    iou = iou_from_matrix(mat).tolist()
    per_class = [None if math.isnan(iou[c]) else iou[c] for c in range(seen[-1] + 1)] if seen else []

    new_fp_rate = None
    if old:
        old_rows = mat[old]
        negatives = int(old_rows.sum())
        if negatives > 0:
            new_fp_rate = int(old_rows[:, new].sum()) / negatives if new else 0.0
    new_fdr = None
    if new:
        predicted_new = int(mat[:, new].sum())
        if predicted_new > 0:
            correct_new = int(mat.diagonal()[new].sum())
            new_fdr = 1.0 - correct_new / predicted_new
    total = int(mat.sum())
    return {
        "miou_old": _nanmean(iou[c] for c in old),
        "miou_new": _nanmean(iou[c] for c in new),
        "miou_all": _nanmean(iou[c] for c in seen),
        "per_class_iou": per_class,
        "new_fp_rate": new_fp_rate,
        "new_fdr": new_fdr,
        "pixel_acc": int(mat.diagonal().sum()) / total if total else None,
    }
