"""``torch.nn`` modules over the fused ops: drop them into your own model and training loop.

Each module is a thin wrapper: it holds the op's hyperparameters (and, for ``CosineMask``, an optional
learnable scale; for ``PLOPPseudoLabeler``, the histogram of a step) and calls the functional op in
``forward``, so it computes exactly what the function does, on the backend ``incrementer_fast.backend`` names.
``reference=True`` calls the plain-PyTorch reference of the op instead (``incrementer_fast.reference``, the
spec the kernels are tested against, differentiated by autograd): the same values within float rounding,
by another implementation, to check a training run against or to debug one.

    import incrementer_fast as inc

    mask = inc.nn.CosineMask(scale=10.0)               # (B, N, D), (B, K, D) -> (B, K, N)
    fod = inc.nn.FODLoss()                             # student, teacher, weight -> 0-dim
    dice = inc.nn.CDSDiceLoss(num_old=16)              # logits (B, C, ...), labels -> 0-dim
    head = inc.nn.SegHeadLoss(num_old=16, new_class_weight=0.5)   # masks (B, K, h, w), labels -> (ce, dice)
    plop = inc.nn.PLOPPseudoLabeler(num_classes=21)    # update() over a step, compute_thresholds(), forward()
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from . import ops as dispatching_ops
from . import reference as reference_ops

__all__ = ["CosineMask", "FODLoss", "CDSDiceLoss", "SegHeadLoss", "PLOPPseudoLabeler"]


def _ops(reference: bool) -> ModuleType:
    """The one choice of implementation every module makes: the namespace its functions are called from,
    ``incrementer_fast.ops`` (the ops, dispatching to the kernels or to the reference as the backend says) or
    ``incrementer_fast.reference`` (the plain-PyTorch spec), which share their signatures. The functions are
    looked up at each call, so a function replaced in either namespace (a test's spy) is the one that runs."""
    return reference_ops if reference else dispatching_ops


def _check_reference(reference) -> bool:
    if not isinstance(reference, bool):
        raise TypeError(f"reference must be True or False, got {reference!r}")
    return reference


def _reference_repr(reference: bool) -> str:
    return ", reference=True" if reference else ""


class CosineMask(nn.Module):
    """Masks as scaled cosine similarities of patch and class embeddings (``inc.cosine_mask``).

    masks[b, k, n] = γ · ⟨p̂[b, n], ĉ[b, k]⟩ with x̂ = x / max(‖x‖₂, eps).

    Args:
        scale: γ, a positive float; required, because no value suits every decoder: 1 gives the plain
            cosines (Segmenter's, which a LayerNorm over the classes follows; the default of the
            functional ``inc.cosine_mask``, which only scales when asked), Incrementer uses 10
            (``inc.Incrementer``'s ``scale``: cosine logits in [−10, 10] that a softmax can make confident).
        learnable_scale: learn log γ, initialised at log ``scale`` (a parameter ``log_scale``), instead of
            keeping γ fixed. The logarithm keeps γ positive under any update, as CLIP's logit scale.
        eps: the floor of the norms.
        out_dtype: the masks' dtype; ``None`` keeps the inputs'. ``torch.float32`` from bfloat16 inputs keeps
            the logits near ±γ at fp32 resolution.
        min_out_dtype: instead of a fixed ``out_dtype``, the least precise dtype of the masks:
            ``torch.promote_types(inputs' dtype, min_out_dtype)``. ``torch.float32`` gives float32 masks
            from bf16/fp16/fp32 embeddings (under autocast, bf16 masks would round logits near ±10 to
            steps of 2^-4) and float64 masks from a float64 model, where a fixed ``out_dtype=float32``
            would round them; ``inc.Incrementer`` uses it. Not together with ``out_dtype``.
        reference: compute with the plain-PyTorch reference ``incrementer_fast.reference.cosine_mask`` (the
            spec) instead of the dispatching op.

    Shape:
        patches (B, N, D), classes (B, K, D) of one float dtype → masks (B, K, N), contiguous.
        A Segmenter-style decoder keeps masks as (B, N, K): use ``mask(patches, classes).transpose(1, 2)``.

    Examples:
        >>> mask = CosineMask(scale=10.0, learnable_scale=True)
        >>> mask(torch.randn(2, 196, 64), torch.randn(2, 21, 64)).shape
        torch.Size([2, 21, 196])
        >>> CosineMask(scale=10.0, min_out_dtype=torch.float32)(torch.randn(2, 4, 8).bfloat16(),
        ...                                                     torch.randn(2, 3, 8).bfloat16()).dtype
        torch.float32
    """

    def __init__(self, scale: float, learnable_scale: bool = False, eps: float = 1e-8,
                 out_dtype: Optional[torch.dtype] = None, min_out_dtype: Optional[torch.dtype] = None,
                 reference: bool = False):
        super().__init__()
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < math.inf:
            raise ValueError(f"scale must be a positive finite float, got {scale!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < math.inf:
            raise ValueError(f"eps must be a positive finite float, got {eps!r}")
        for name, dtype in (("out_dtype", out_dtype), ("min_out_dtype", min_out_dtype)):
            if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise TypeError(f"{name} must be None or a floating torch.dtype, got {dtype!r}")
        if out_dtype is not None and min_out_dtype is not None:
            raise ValueError(f"give out_dtype ({out_dtype}) or min_out_dtype ({min_out_dtype}), not both")
        self.eps = float(eps)
        self.out_dtype = out_dtype
        self.min_out_dtype = min_out_dtype
        self.reference = _check_reference(reference)
        self.initial_scale = float(scale)
        self.learnable_scale = bool(learnable_scale)
        log_scale = nn.Parameter(torch.tensor(math.log(scale))) if self.learnable_scale else None
        self.register_parameter("log_scale", log_scale)

    @property
    def scale(self) -> Union[float, torch.Tensor]:
        """γ: the fixed float, or exp(log_scale) (a 0-dim tensor that carries the gradient)."""
        return self.initial_scale if self.log_scale is None else self.log_scale.exp()

    def forward(self, patches: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        out_dtype = self.out_dtype
        if self.min_out_dtype is not None:
            out_dtype = torch.promote_types(patches.dtype, self.min_out_dtype)
        return _ops(self.reference).cosine_mask(patches, classes, scale=self.scale, eps=self.eps,
                                                out_dtype=out_dtype)

    def extra_repr(self) -> str:
        kind = "learnable_scale=True, initial " if self.learnable_scale else ""
        dtype = "" if self.out_dtype is None else f", out_dtype={self.out_dtype}"
        if self.min_out_dtype is not None:
            dtype = f", min_out_dtype={self.min_out_dtype}"
        return f"{kind}scale={self.initial_scale}, eps={self.eps}{dtype}{_reference_repr(self.reference)}"


class FODLoss(nn.Module):
    """FOD's cosine distillation loss (``inc.fod_loss``): Σ_i w_i (1 − ⟨ŝ_i, t̂_i⟩) / Σ_i w_i.

    Args:
        eps: the floor of the norms.
        reference: compute with the plain-PyTorch reference ``incrementer_fast.reference.fod_loss`` (the spec)
            instead of the dispatching op.

    Shape:
        student, teacher (..., D); weight (...) or ``None`` for unit weights (the old classes' embeddings)
        → a 0-dim float32 loss (float64 for float64 inputs); 0 with zero gradients when Σ w = 0.

    Examples:
        >>> fod = FODLoss()
        >>> student = torch.randn(2, 196, 64, requires_grad=True)
        >>> fod(student, torch.randn(2, 196, 64), torch.rand(2, 196)).backward()
    """

    def __init__(self, eps: float = 1e-8, reference: bool = False):
        super().__init__()
        self.eps = float(eps)
        self.reference = _check_reference(reference)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if weight is None:
            weight = student.new_ones(student.shape[:-1])
        return _ops(self.reference).fod_loss(student, teacher, weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}{_reference_repr(self.reference)}"


class CDSDiceLoss(nn.Module):
    """CDS's old/new dice loss (``inc.cds_dice_loss``) of logits against labels.

    Args:
        num_old: classes of the earlier steps, background included (1 ≤ num_old < C); set the attribute
            anew for the next step.
        ignore_index: the label value left out.
        smooth: the dice's additive smoothing.
        reference: compute with the plain-PyTorch reference ``incrementer_fast.reference.cds_dice_loss`` (the spec)
            instead of the dispatching op.

    Shape:
        logits (B, C, *spatial) of a float dtype, labels (B, *spatial) of an integer dtype → 0-dim float32.

    Examples:
        >>> dice = CDSDiceLoss(num_old=16)
        >>> dice(torch.randn(2, 21, 32, 32), torch.randint(0, 21, (2, 32, 32))).shape
        torch.Size([])
    """

    def __init__(self, num_old: int, ignore_index: int = 255, smooth: float = 1.0, reference: bool = False):
        super().__init__()
        self.num_old = num_old
        self.ignore_index = ignore_index
        self.smooth = float(smooth)
        self.reference = _check_reference(reference)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _ops(self.reference).cds_dice_loss(logits, labels, self.num_old, ignore_index=self.ignore_index,
                                                  smooth=self.smooth)

    def extra_repr(self) -> str:
        return (f"num_old={self.num_old}, ignore_index={self.ignore_index}, smooth={self.smooth}"
                f"{_reference_repr(self.reference)}")


class SegHeadLoss(nn.Module):
    """The segmentation head's class-weighted CE and CDS dice from patch-resolution masks
    (``inc.seg_head_loss``), without materialising the full-resolution logits.

    Args:
        num_old: classes of the earlier steps, background included (1 ≤ num_old < K).
        new_class_weight: the CE weight of the classes c ≥ num_old (1 = unweighted).
        ignore_index: the label value left out.
        smooth: the dice's additive smoothing.
        reference: compute with the plain-PyTorch reference ``incrementer_fast.reference.seg_head_loss`` (the
            spec: full-resolution logits, ``F.cross_entropy`` and ``cds_dice_loss``, differentiated by
            autograd) instead of the dispatching op.

    Shape:
        masks (B, K, h, w), labels (B, H, W), image_weight (B,) or ``None`` (PLOP's per-image factor),
        dice_labels (B, H, W) or ``None`` (the labels of the dice's masks: the step's ground truth beside
        pseudo-labels; ``labels`` when None) → ``(ce, dice)``, two 0-dim float32 losses; the pixel logits are
        the bilinear (align_corners=False) upsampling of masks to (H, W).

    Examples:
        >>> head = SegHeadLoss(num_old=16, new_class_weight=0.5)
        >>> ce, dice = head(torch.randn(2, 21, 32, 32), torch.randint(0, 21, (2, 512, 512)))
    """

    def __init__(self, num_old: int, new_class_weight: float = 1.0, ignore_index: int = 255, smooth: float = 1.0,
                 reference: bool = False):
        super().__init__()
        self.num_old = num_old
        self.new_class_weight = float(new_class_weight)
        self.ignore_index = ignore_index
        self.smooth = float(smooth)
        self.reference = _check_reference(reference)

    def forward(self, masks: torch.Tensor, labels: torch.Tensor, image_weight: Optional[torch.Tensor] = None,
                dice_labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return _ops(self.reference).seg_head_loss(
            masks, labels, self.num_old, new_class_weight=self.new_class_weight, ignore_index=self.ignore_index,
            smooth=self.smooth, image_weight=image_weight, dice_labels=dice_labels)

    def extra_repr(self) -> str:
        return (f"num_old={self.num_old}, new_class_weight={self.new_class_weight}, "
                f"ignore_index={self.ignore_index}, smooth={self.smooth}{_reference_repr(self.reference)}")


class PLOPPseudoLabeler(nn.Module):
    """PLOP's entropy pseudo-labels from the frozen teacher, holding the step's entropy histogram.

    Use it in two passes over a step's training images: ``update(teacher_masks, labels)`` on every batch
    (the histogram of ``inc.entropy_histogram``, summed), then ``compute_thresholds()`` once (the per-class
    medians of ``inc.plop_thresholds``; under ``torch.distributed`` the histograms of every process are
    summed first, so every rank must call it), then ``forward(teacher_masks, labels)`` during training
    gives ``(pseudo_labels, image_factor)`` (``inc.pseudo_label``). ``reset(num_classes)`` before the next
    step.

    The step state is two attributes, which may also be assigned: ``histogram`` (K_old, num_bins) int64 —
    a process with no image of its own under ``torch.distributed`` sets it to zeros, so that it can join
    the others in ``compute_thresholds`` — and ``thresholds`` (K_old,) float32, for thresholds computed
    elsewhere (a benchmark's fixed values, a saved run's).

    Args:
        num_classes: K_total, the step's classes, old and new (PLOP divides its entropy by log K_total).
        num_bins: entropy bins.
        floor: the smallest threshold.
        ignore_index: the label of the background pixels left without a confident pseudo-label.
        min_image_factor: the floor of PLOP's per-image factor.
        entropy: ``"plop"`` (PLOP's released entropy and median search, the default) or ``"normalized"``
            (H / ln K_old with the interpolated median); see ``inc.entropy_histogram``.
        reference: compute with the plain-PyTorch references ``incrementer_fast.reference.entropy_histogram``,
            ``.plop_thresholds`` and ``.pseudo_label`` (the spec) instead of the dispatching ops.

    Shape:
        teacher_masks (B, K_old, h, w) patch-resolution logits, labels (B, H, W) (0 = background) →
        pseudo-labels (B, H, W) int64 and the per-image factor (B,) (``image_weight`` of ``SegHeadLoss``).

    Examples:
        >>> plop = PLOPPseudoLabeler(num_classes=21)
        >>> teacher_masks, labels = torch.randn(2, 16, 32, 32), torch.randint(0, 21, (2, 512, 512))
        >>> plop.update(teacher_masks, labels)
        >>> plop.compute_thresholds().shape
        torch.Size([16])
        >>> pseudo, factor = plop(teacher_masks, labels)
    """

    histogram: Optional[torch.Tensor]
    thresholds: Optional[torch.Tensor]

    def __init__(self, num_classes: int, num_bins: int = 100, floor: float = 0.001, ignore_index: int = 255,
                 min_image_factor: float = 0.0, entropy: str = "plop", reference: bool = False):
        super().__init__()
        if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 1:
            raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
        self.num_classes = num_classes
        self.entropy = entropy
        self.num_bins = num_bins
        self.floor = float(floor)
        self.ignore_index = ignore_index
        self.min_image_factor = float(min_image_factor)
        self.reference = _check_reference(reference)
        # Step state, not weights: kept out of state_dict (their shape depends on the teacher's K_old).
        self.register_buffer("histogram", None, persistent=False)
        self.register_buffer("thresholds", None, persistent=False)

    def reset(self, num_classes: Optional[int] = None) -> None:
        """Forget the histogram and the thresholds (before the next step, whose K_total is ``num_classes``)."""
        if num_classes is not None:
            self.num_classes = num_classes
        self.histogram = None
        self.thresholds = None

    @torch.no_grad()
    def update(self, teacher_masks: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the entropy histogram of one batch (labels: the step's training labels, 0 = background)."""
        counts = _ops(self.reference).entropy_histogram(
            teacher_masks, labels, self.num_bins, num_classes=self.num_classes, entropy=self.entropy)
        if self.histogram is None:
            self.histogram = counts
        elif self.histogram.shape != counts.shape:
            raise ValueError(f"teacher_masks (B, K_old, h, w) = {tuple(teacher_masks.shape)} does not match the "
                             f"histogram of this step, (K_old, num_bins) = {tuple(self.histogram.shape)}: "
                             "call reset() before a new step")
        else:
            self.histogram += counts

    @torch.no_grad()
    def compute_thresholds(self) -> torch.Tensor:
        """The per-class thresholds (K_old,) from the histogram, summed over processes under DDP; kept for
        ``forward``. The sum goes to a copy: ``histogram`` stays this process's own, so a second call gives
        the same thresholds instead of counting every image again."""
        if self.histogram is None:
            raise RuntimeError("compute_thresholds() needs the histogram: call update() on the step's batches first")
        histogram = self.histogram
        if dist.is_available() and dist.is_initialized():
            histogram = histogram.clone()
            dist.all_reduce(histogram)
        median = "plop" if self.entropy == "plop" else "interpolated"
        self.thresholds = _ops(self.reference).plop_thresholds(
            histogram, self.floor, median=median).to(histogram.device)
        return self.thresholds

    def forward(self, teacher_masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.thresholds is None:
            raise RuntimeError("PLOPPseudoLabeler has no thresholds: call update() over the step's images, then "
                               "compute_thresholds(), before labelling")
        return _ops(self.reference).pseudo_label(
            teacher_masks, labels, self.thresholds, ignore_index=self.ignore_index,
            min_image_factor=self.min_image_factor, num_classes=self.num_classes, entropy=self.entropy)

    def extra_repr(self) -> str:
        state = "no histogram" if self.histogram is None else f"histogram {tuple(self.histogram.shape)}"
        if self.thresholds is not None:
            state += ", thresholds set"
        return (f"num_classes={self.num_classes}, num_bins={self.num_bins}, floor={self.floor}, "
                f"ignore_index={self.ignore_index}, min_image_factor={self.min_image_factor}, "
                f"entropy={self.entropy!r}{_reference_repr(self.reference)}, {state}")
