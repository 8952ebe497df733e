"""``incrementer-fast check``: the gradient-parity suite, run on your own machine against the float64 reference.

    incrementer-fast check [--device cuda|cpu] [--quick | --thorough] [--backend auto|reference|triton]
                           [--ops cosine_mask,fod_loss,...]
    python -m incrementer_fast.check ...

For every op, over shapes, dtypes and memory layouts (contiguous, transposed, strided and stride-0 inputs,
and the stride-0 upstream gradient that ``.sum()`` produces), it runs the op on the chosen device and backend,
runs the plain-PyTorch reference in float64 on the same input values, and compares outputs and gradients by
the relative-norm error of ``incrementer_fast.testing`` against the per-dtype bound the repository's own
tests use (``REL_ERR_BOUND``). It prints an environment report (torch, triton, CUDA, the GPU, xformers, the
backend each op takes) and one table row per case, and exits 1 when any case fails (2 for bad options).

Error measures. Outputs and gradients: ‖a − b‖ / ‖b‖, where a gradient that is a projection (cosine_mask,
fod_loss) is measured against the size of the terms whose difference it is (‖b‖ or larger), as in the tests.
``entropy_histogram`` and ``pseudo_label`` return integers: in float64 they must equal the reference exactly;
in lower precision a pixel may change bin or pseudo-label only where the float64 value lies within rounding of
a bin edge, a threshold or an argmax tie, and the error column is the fraction of changes not so explained
(bound 0). ``plop_thresholds`` is plain torch on both backends and is not a case of its own.

Needs only the installed package (no repository, no test dependencies).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import os
import platform
import sys
import time
import zlib
from typing import Callable, Optional, Sequence

import torch

from . import _dispatch, reference
from .constants import IGNORE_INDEX
from .ops.cds_dice_loss import cds_dice_loss
from .ops.cosine_mask import cosine_mask
from .ops.fod_loss import fod_loss
from .ops.seg_head import entropy_histogram, pseudo_label, seg_head_loss
from .reference.seg_head import teacher_prediction, upsample_logits
from .testing import REL_ERR_BOUND, speed_up_interpreter

__all__ = ["OPS", "Row", "environment_report", "run_checks", "main"]

OPS = ("cosine_mask", "fod_loss", "cds_dice_loss", "seg_head_loss", "entropy_histogram", "pseudo_label")
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
               torch.bfloat16: "bfloat16"}


@dataclasses.dataclass
class Row:
    """One case: the largest forward and gradient errors against the float64 reference, and the verdict."""

    op: str
    dtype: str
    case: str
    forward: Optional[float] = None
    gradient: Optional[float] = None
    bound: float = 0.0
    passed: bool = False
    note: str = ""


# ------------------------------------------------------------------------------------------ inputs
def _arrange(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` in a memory layout; the result is a fresh leaf (or a view of one) with those values."""
    if layout == "contiguous":
        return values.clone()
    if layout == "transposed":  # the last dimension is the slowest in memory
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of the last dimension of a wider tensor
        wide = values.new_zeros((*values.shape[:-1], 2 * values.shape[-1]))
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "batch_expanded":  # one item shared by the batch through a stride-0 view (learned tokens)
        return values[:1].clone().expand_as(values)
    raise ValueError(layout)


class _Inputs:
    """Deterministic random values (drawn on the CPU, so every device sees the same numbers)."""

    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device

    def normal(self, shape, dtype, layout="contiguous", scale=1.0) -> torch.Tensor:
        values = torch.randn(shape, generator=self.generator, dtype=torch.float64) * scale
        return _arrange(values.to(device=self.device, dtype=dtype), layout)

    def uniform(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, dtype=torch.float64).to(device=self.device, dtype=dtype)

    def labels(self, shape, num_classes: int, ignore_fraction=0.2, background_fraction=0.0) -> torch.Tensor:
        labels = torch.randint(0, num_classes, shape, generator=self.generator)
        labels[torch.rand(shape, generator=self.generator) < background_fraction] = 0
        labels[torch.rand(shape, generator=self.generator) < ignore_fraction] = IGNORE_INDEX
        return labels.to(self.device)

    def upstream(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        """The gradient reaching the op: random, or stride-0 (what ``.sum()`` or a broadcast sends)."""
        if kind == "random":
            return self.normal(like.shape, like.dtype)
        if like.dim() == 0:  # a 0-dim view into an expanded tensor
            return self.normal((4,), like.dtype).expand(3, 4)[1, 2]
        return torch.ones((), dtype=like.dtype, device=self.device).expand(like.shape)


def _float64_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(t.requires_grad)


def _error(actual: torch.Tensor, expected: torch.Tensor, natural: float = 0.0) -> float:
    """‖a − b‖ / max(‖b‖, natural); inf for a shape mismatch or a non-finite value.

    For float16 results, one subnormal quantum per element (2^-24, the spacing below 2^-14) is not counted:
    small gradients of a mean over many pixels are stored there, where rounding is absolute, not relative.
    """
    if actual.shape != expected.shape or not torch.isfinite(actual.detach().double()).all():
        return math.inf
    diff = torch.linalg.vector_norm(actual.detach().double() - expected.detach().double()).item()
    if actual.dtype == torch.float16:
        quantum = torch.finfo(torch.float16).smallest_normal * torch.finfo(torch.float16).eps
        diff = max(diff - quantum * math.sqrt(actual.numel()), 0.0)
    scale = max(torch.linalg.vector_norm(expected.detach().double()).item(), natural)
    return diff / scale if scale > 0 else diff


# ------------------------------------------------------------------------------------------ ops
def _cosine_mask_case(inputs: _Inputs, dtype, size, layouts, grad_kind):
    batch, patches_n, classes_k, dim = size
    patches = inputs.normal((batch, patches_n, dim), dtype, layouts[0]).requires_grad_()
    classes = inputs.normal((batch, classes_k, dim), dtype, layouts[1]).requires_grad_()
    # A learnable γ, as a model holds it: float32 (float64 in a float64 model).
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(3.0, dtype=scale_dtype, device=inputs.device, requires_grad=True)
    masks = cosine_mask(patches, classes, scale)
    upstream = inputs.upstream(grad_kind, masks)
    grads = torch.autograd.grad(masks, (patches, classes, scale), upstream)

    p, c, s = _float64_leaf(patches), _float64_leaf(classes), _float64_leaf(scale)
    expected = reference.cosine_mask(p, c, s)
    g = upstream.double()
    expected_grads = torch.autograd.grad(expected, (p, c, s), g)
    with torch.no_grad():  # the sizes of the terms each gradient is a difference of
        inv_p = 1 / torch.linalg.vector_norm(p, dim=-1, keepdim=True).clamp_min(1e-8)
        inv_c = 1 / torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min(1e-8)
        raw = torch.bmm(c * inv_c, (p * inv_p).transpose(1, 2))
        natural = (3.0 * torch.linalg.vector_norm(torch.bmm(g.transpose(1, 2), c * inv_c) * inv_p).item(),
                   3.0 * torch.linalg.vector_norm(torch.bmm(g, p * inv_p) * inv_c).item(),
                   (g * raw).abs().sum().item())
    forward = [_error(masks, expected)]
    gradient = [_error(a, b, n) for a, b, n in zip(grads, expected_grads, natural)]
    dtypes_ok = masks.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    return forward, gradient, "" if dtypes_ok else "wrong output or gradient dtype"


def _fod_loss_case(inputs: _Inputs, dtype, size, layouts, grad_kind):
    batch, tokens, dim = size
    student = inputs.normal((batch, tokens, dim), dtype, layouts[0]).requires_grad_()
    teacher = inputs.normal((batch, tokens, dim), dtype, layouts[1]).requires_grad_()
    weight = inputs.uniform((batch, tokens)) * (inputs.uniform((batch, tokens)) < 0.7)
    loss = fod_loss(student, teacher, weight)
    upstream = inputs.upstream(grad_kind, loss)
    grads = torch.autograd.grad(loss, (student, teacher), upstream)

    s, t = _float64_leaf(student), _float64_leaf(teacher)
    expected = reference.fod_loss(s, t, weight.double())
    expected_grads = torch.autograd.grad(expected, (s, t), upstream.double())
    w = weight.double()
    naturals = []
    for x in (s, t):  # ‖(g·w_i / Σw) / ‖x_i‖‖: the terms whose difference is the gradient
        norms = torch.linalg.vector_norm(x.detach(), dim=-1).clamp_min(1e-8)
        naturals.append(torch.linalg.vector_norm(upstream.double() * w / w.sum() / norms).item())
    forward = [_error(loss, expected)]
    gradient = [_error(a, b, n) for a, b, n in zip(grads, expected_grads, naturals)]
    return forward, gradient, ""


def _cds_dice_loss_case(inputs: _Inputs, dtype, size, layouts, grad_kind):
    batch, classes_c, height, width = size
    logits = inputs.normal((batch, classes_c, height, width), dtype, layouts[0], scale=2.0).requires_grad_()
    labels = inputs.labels((batch, height, width), classes_c)
    num_old = (classes_c + 1) // 2
    loss = cds_dice_loss(logits, labels, num_old)
    upstream = inputs.upstream(grad_kind, loss)
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    x = _float64_leaf(logits)
    expected = reference.cds_dice_loss(x, labels, num_old)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream.double())
    return [_error(loss, expected)], [_error(grad, expected_grad)], "" if grad.dtype == dtype else "wrong gradient dtype"


def _seg_head_loss_case(inputs: _Inputs, dtype, size, layouts, grad_kind):
    batch, classes_k, h, w, factor = size
    masks = inputs.normal((batch, classes_k, h, w), dtype, layouts[0], scale=3.0).requires_grad_()
    size_hw = (batch, h * factor + 1, w * factor + 2)  # not multiples of (h, w)
    labels = inputs.labels(size_hw, classes_k)  # the pseudo-labels of training
    dice_labels = inputs.labels(size_hw, classes_k, ignore_fraction=0.05)  # the step's ground truth
    image_weight = inputs.uniform((batch,))
    num_old = (classes_k + 1) // 2
    options = dict(new_class_weight=0.5, dice_labels=dice_labels)
    ce, dice = seg_head_loss(masks, labels, num_old, image_weight=image_weight, **options)
    loss = ce + 0.7 * dice
    upstream = inputs.upstream(grad_kind, loss)
    (grad,) = torch.autograd.grad(loss, masks, upstream)
    m = _float64_leaf(masks)
    ref_ce, ref_dice = reference.seg_head_loss(m, labels, num_old, image_weight=image_weight.double(), **options)
    (expected_grad,) = torch.autograd.grad(ref_ce + 0.7 * ref_dice, m, upstream.double())
    return ([_error(ce, ref_ce), _error(dice, ref_dice)], [_error(grad, expected_grad)],
            "" if grad.dtype == dtype else "wrong gradient dtype")


def _ambiguous_pixels(teacher: torch.Tensor, size, entropy: str, num_classes: int, num_bins=None,
                      thresholds=None) -> torch.Tensor:
    """The pixels where the rounding of the op's float32 arithmetic may change a bin (the float64 entropy e
    within 1e-5·e of a bin edge), a pseudo-label (within 1e-5·e of its threshold) or the prediction (the two
    largest logits within 1e-5): a boolean (B, H, W)."""
    logits = upsample_logits(teacher.double(), size)
    prediction, values = teacher_prediction(teacher.double(), size, entropy, num_classes)
    band = 1e-5 * values.abs() + 1e-12
    top2 = logits.topk(2, dim=1).values
    ambiguous = (top2[:, 0] - top2[:, 1]) < 1e-5
    if num_bins is not None:
        edge = values * num_bins
        ambiguous |= (edge - edge.round()).abs() < band * num_bins
    if thresholds is not None:
        ambiguous |= (values - thresholds.double()[prediction]).abs() < band
    return ambiguous


def _teacher_inputs(inputs: _Inputs, dtype, size, layout):
    """Teacher masks (B, K_old, h, w), training labels (B, H, W) with 60 % background, and K_total."""
    batch, num_old, h, w, factor = size
    teacher = inputs.normal((batch, num_old, h, w), dtype, layout, scale=2.0)
    num_classes = num_old + 2  # the step adds two classes
    labels = inputs.labels((batch, h * factor, w * factor), num_classes, background_fraction=0.6)
    return teacher, labels, num_classes


def _entropy_histogram_case(inputs: _Inputs, dtype, size, layouts, entropy):
    teacher, labels, num_classes = _teacher_inputs(inputs, dtype, size, layouts[0])
    num_bins = 100
    options = dict(num_classes=num_classes, entropy=entropy)
    histogram = entropy_histogram(teacher, labels, num_bins, **options)
    expected = reference.entropy_histogram(teacher.double(), labels, num_bins, **options)
    if histogram.dtype != torch.int64 or histogram.shape != expected.shape:
        return [math.inf], [], "wrong histogram dtype or shape"
    moved = (histogram - expected).abs().sum().item()
    total = max(expected.sum().item(), 1)
    if dtype == torch.float64:
        return [moved / total], [], ""
    ambiguous = _ambiguous_pixels(teacher, tuple(labels.shape[1:]), entropy, num_classes, num_bins=num_bins)
    explained = 2 * (ambiguous & (labels == 0)).sum().item()  # a moved pixel leaves one bin, enters another
    return [max(moved - explained, 0) / total], [], f"{moved} counts moved, {explained} allowed" if moved else ""


def _pseudo_label_case(inputs: _Inputs, dtype, size, layouts, entropy):
    teacher, labels, num_classes = _teacher_inputs(inputs, dtype, size, layouts[0])
    options = dict(num_classes=num_classes, entropy=entropy)
    # Realistic thresholds: the per-class medians of this batch (in float64), as the trainer computes them.
    median = "plop" if entropy == "plop" else "interpolated"
    histogram = reference.entropy_histogram(teacher.double(), labels, 100, **options)
    thresholds = reference.plop_thresholds(histogram, median=median)
    pseudo, factor_op = pseudo_label(teacher, labels, thresholds, min_image_factor=0.05, **options)
    expected, expected_factor = reference.pseudo_label(teacher.double(), labels, thresholds, min_image_factor=0.05,
                                                       **options)
    if pseudo.dtype != torch.int64 or pseudo.shape != expected.shape:
        return [math.inf], [], "wrong pseudo-label dtype or shape"
    differ = pseudo != expected
    pixels = differ.numel()
    if dtype == torch.float64:
        return [differ.sum().item() / pixels, _error(factor_op, expected_factor)], [], ""
    ambiguous = _ambiguous_pixels(teacher, tuple(labels.shape[1:]), entropy, num_classes, thresholds=thresholds)
    unexplained = (differ & ~ambiguous).sum().item()
    background = (labels == 0).sum((1, 2)).double()
    allowed = (differ & ambiguous & (labels == 0)).sum((1, 2)).double() / (background + 1e-6) + 1e-6
    factor_ok = ((factor_op.double() - expected_factor).abs() <= allowed).all().item()
    note = f"{differ.sum().item()} pixels differ at a threshold" if differ.any() else ""
    return [unexplained / pixels + (0.0 if factor_ok else math.inf)], [], note


# ------------------------------------------------------------------------------------------ cases
@dataclasses.dataclass(frozen=True)
class _Case:
    op: str
    dtype: torch.dtype
    size: tuple
    layouts: tuple
    kind: str  # the upstream gradient (random or stride-0), or the entropy of the PLOP ops

    @property
    def name(self) -> str:
        layouts = "/".join(self.layouts)
        kind = f", {self.kind} entropy" if self.op in ("entropy_histogram", "pseudo_label") else f", {self.kind} grad"
        return f"{'×'.join(map(str, self.size))} {layouts}{kind}"


_RUNNERS: dict[str, Callable] = {
    "cosine_mask": _cosine_mask_case,
    "fod_loss": _fod_loss_case,
    "cds_dice_loss": _cds_dice_loss_case,
    "seg_head_loss": _seg_head_loss_case,
    "entropy_histogram": _entropy_histogram_case,
    "pseudo_label": _pseudo_label_case,
}

# (op) -> [(layouts, kind)]: the layouts each case gives the op's tensor inputs, and the upstream gradient
# (random or stride-0) or, for the PLOP ops, the entropy (PLOP's own, the default, or the normalised one).
_LAYOUTS = {
    "cosine_mask": [(("contiguous", "contiguous"), "random"), (("transposed", "batch_expanded"), "stride-0"),
                    (("strided", "transposed"), "random"), (("contiguous", "batch_expanded"), "random")],
    "fod_loss": [(("contiguous", "contiguous"), "random"), (("transposed", "strided"), "stride-0"),
                 (("strided", "batch_expanded"), "random")],
    "cds_dice_loss": [(("contiguous",), "random"), (("channels_last",), "stride-0"), (("transposed",), "random"),
                      (("strided",), "random")],
    "seg_head_loss": [(("contiguous",), "random"), (("channels_last",), "stride-0"), (("transposed",), "random"),
                      (("strided",), "random")],
    "entropy_histogram": [(("contiguous",), "plop"), (("channels_last",), "normalized"), (("transposed",), "plop")],
    "pseudo_label": [(("contiguous",), "plop"), (("channels_last",), "normalized"), (("transposed",), "plop")],
}

# (op) -> sizes by level; cosine_mask (B, N, K, D), fod_loss (B, N, D), cds_dice_loss (B, C, H, W),
# seg_head_loss (B, K, h, w, label upsampling factor), PLOP (B, K_old, h, w, factor). "thorough" adds paper-like sizes.
_SIZES = {
    "quick": {"cosine_mask": [(2, 16, 5, 32)], "fod_loss": [(2, 16, 32)], "cds_dice_loss": [(2, 5, 6, 7)],
              "seg_head_loss": [(2, 5, 3, 4, 3)], "entropy_histogram": [(2, 4, 3, 4, 3)],
              "pseudo_label": [(2, 4, 3, 4, 3)]},
    "default": {"cosine_mask": [(2, 197, 21, 64)], "fod_loss": [(2, 197, 64)], "cds_dice_loss": [(2, 21, 33, 31)],
                "seg_head_loss": [(2, 21, 8, 8, 8)], "entropy_histogram": [(2, 16, 8, 8, 8)],
                "pseudo_label": [(2, 16, 8, 8, 8)]},
    "thorough": {"cosine_mask": [(2, 197, 21, 64), (4, 1024, 151, 192), (1, 1, 1, 1)],
                 "fod_loss": [(2, 197, 64), (8, 1024, 768), (1, 1, 3)],
                 "cds_dice_loss": [(2, 21, 33, 31), (2, 151, 128, 128), (1, 2, 1, 1)],
                 "seg_head_loss": [(2, 21, 8, 8, 8), (2, 151, 32, 32, 16), (1, 2, 1, 1, 1)],
                 "entropy_histogram": [(2, 16, 8, 8, 8), (2, 101, 32, 32, 16)],
                 "pseudo_label": [(2, 16, 8, 8, 8), (2, 101, 32, 32, 16)]},
}

_ALL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def plan(level: str, ops: Sequence[str] = OPS) -> list[_Case]:
    """The cases of a level: ``quick`` (a few per op, tiny: seconds, also through Triton's interpreter),
    ``default`` (every dtype × every layout at moderate sizes) or ``thorough`` (plus paper-like sizes and
    degenerate ones)."""
    cases = []
    for op in ops:
        layouts = _LAYOUTS[op]
        for size in _SIZES[level][op]:
            if level == "quick":
                # fp32 on every layout, then one case each of bf16 and fp64.
                chosen = [(torch.float32, lay, kind) for lay, kind in layouts[:2]]
                chosen += [(torch.bfloat16, *layouts[0]), (torch.float64, *layouts[-1])]
            else:
                chosen = [(dtype, lay, kind) for dtype in _ALL_FLOATS for lay, kind in layouts]
            cases += [_Case(op, dtype, size, lay, kind) for dtype, lay, kind in chosen]
    return cases


def run_case(case: _Case, device: torch.device) -> Row:
    row = Row(case.op, DTYPE_NAMES[case.dtype], case.name)
    discrete = case.op in ("entropy_histogram", "pseudo_label")
    row.bound = 0.0 if discrete else REL_ERR_BOUND[case.dtype]
    seed = zlib.crc32(repr((case.op, DTYPE_NAMES[case.dtype], case.size, case.layouts, case.kind)).encode())
    try:
        forward, gradient, note = _RUNNERS[case.op](_Inputs(seed, device), case.dtype, case.size, case.layouts,
                                                    case.kind)
    except Exception as error:  # a crash is a failed case, reported in its row
        row.note = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
        return row
    row.forward = max(forward)
    row.gradient = max(gradient) if gradient else None
    row.note = note
    errors = forward + gradient
    row.passed = all(e <= row.bound for e in errors) and not note.startswith("wrong")
    return row


def run_checks(device: torch.device | str, level: str = "default", ops: Sequence[str] = OPS,
               on_row: Optional[Callable[[Row], None]] = None) -> list[Row]:
    """Run the cases of ``level`` for ``ops`` on ``device`` (on the backend in effect: see ``use_backend``)
    and return one ``Row`` per case; ``on_row`` is called as each finishes."""
    device = torch.device(device)
    if device.type == "cpu" and _dispatch.INTERPRET:
        speed_up_interpreter()  # host time only: the kernels compute the same bits (see there)
    rows = []
    for case in plan(level, ops):
        row = run_case(case, device)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


# ------------------------------------------------------------------------------------------ report
def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report(device: torch.device) -> list[tuple[str, str]]:
    """(name, value) lines: versions, the device, and which implementation every op and attention takes."""
    lines = [("incrementer_fast", _version("incrementer_fast")), ("python", platform.python_version()),
             ("platform", platform.platform())]
    cuda = torch.version.cuda or "none (CPU build)"
    lines.append(("torch", f"{torch.__version__} (CUDA {cuda})"))
    lines.append(("triton", _version("triton") if _dispatch.HAS_TRITON else "not importable"))
    lines.append(("xformers", _version("xformers")))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append((f"cuda:{index}", f"{props.name}, sm_{props.major}{props.minor}, "
                                           f"{props.total_memory / 2**30:.0f} GiB"))
    else:
        lines.append(("GPU", "none visible (torch.cuda.is_available() is False)"))
    lines.append(("TRITON_INTERPRET", "1 (kernels run on CPU tensors through the interpreter)"
                  if _dispatch.INTERPRET else "unset"))
    env_choice = os.environ.get(_dispatch.ENV_VAR)
    lines.append(("backend choice", f"{_dispatch.selected_backend()} "
                                    f"({_dispatch.ENV_VAR}={env_choice!r})" if env_choice else
                  f"{_dispatch.selected_backend()} ({_dispatch.ENV_VAR} unset)"))
    try:
        taken = _dispatch.backend(device)
        if taken == "triton":
            target = _dispatch.launch_target(device)
            taken += f" (launch plan: {target.name}, {target.multiprocessors} SMs)"
    except (RuntimeError, ValueError) as error:
        taken = f"error: {error}"
    for op in OPS:
        lines.append((f"{op} on {device.type}", taken))
    try:
        from .attention import resolve_backend

        choices = []
        for dtype in (torch.float32, torch.bfloat16):
            try:
                choices.append(f"{DTYPE_NAMES[dtype]}: {resolve_backend(device, dtype)}")
            except RuntimeError as error:
                choices.append(f"{DTYPE_NAMES[dtype]}: error ({error})")
        lines.append((f"attention on {device.type}", ", ".join(choices)))
    except Exception as error:  # timm missing or broken: the ops do not need it
        lines.append((f"attention on {device.type}", f"unavailable ({type(error).__name__}: {error})"))
    return lines


def _format(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1e}"


HEADER = f"{'op':<18} {'dtype':<9} {'case':<50} {'forward':>8} {'gradient':>8} {'bound':>8}  pass"


def format_row(row: Row) -> str:
    verdict = "ok" if row.passed else "FAIL"
    line = (f"{row.op:<18} {row.dtype:<9} {row.case:<50} {_format(row.forward):>8} {_format(row.gradient):>8} "
            f"{_format(row.bound):>8}  {verdict}")
    return f"{line}  {row.note}" if row.note else line


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="incrementer-fast check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None,
                        help="device to check on (cuda, cuda:1, cpu; default: cuda when available, else cpu)")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quick", dest="level", action="store_const", const="quick",
                       help="a few tiny cases per op (seconds, also through Triton's interpreter)")
    level.add_argument("--thorough", dest="level", action="store_const", const="thorough",
                       help="also paper-like sizes (K = 151, 1024 tokens, 128² logits) and degenerate ones")
    parser.set_defaults(level="default")
    parser.add_argument("--backend", choices=_dispatch.BACKENDS, default=None,
                        help="run the ops on this backend (default: the current choice, "
                             f"{_dispatch.ENV_VAR} or auto)")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma-separated ops to check (default: all of {', '.join(OPS)})")
    return parser


def run(args: argparse.Namespace, out=None) -> int:
    """Run the check for parsed options; 0 when every case passes, 1 otherwise, 2 for unusable options."""
    out = out or sys.stdout
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        print(f"incrementer-fast check: error: unknown op(s) {', '.join(unknown) or '(none given)'}; "
              f"choose from {', '.join(OPS)}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # torch's message lists every device type it knows; the ops run on two
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        print(f"incrementer-fast check: error: --device {args.device}: expected cpu, cuda or cuda:N",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("incrementer-fast check: error: --device cuda, but torch sees no CUDA device "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})", file=sys.stderr)
        return 2
    choice = args.backend or _dispatch.selected_backend()
    try:
        with _dispatch.use_backend(choice):
            _dispatch.backend(device)  # an impossible choice fails here, once, not in every row
            started = time.perf_counter()
            print(f"incrementer_fast parity check ({args.level}) on {device}: every op against the float64 "
                  "reference", file=out)
            for name, value in environment_report(device):
                print(f"  {name:<24} {value}", file=out)
            print(file=out)
            print(HEADER, file=out)
            rows = run_checks(device, args.level, ops, on_row=lambda row: print(format_row(row), file=out, flush=True))
    except RuntimeError as error:
        print(f"incrementer-fast check: error: {error}", file=sys.stderr)
        return 2
    failed = [row for row in rows if not row.passed]
    print(f"\n{len(rows)} cases, {len(failed)} failed ({time.perf_counter() - started:.1f} s)", file=out)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
