"""Workloads shared by ``benchmarks/run.py`` and ``benchmarks/bench_ops.py``: op cases, providers, byte models.

Providers
---------
* ``fused``    — the public op ``inc.<op>`` (Triton kernels on CUDA). Skipped on the CPU: there the op runs
  the reference, or the kernels through Triton's interpreter, which exists for correctness, not speed.
* ``eager``    — the plain-PyTorch reference ``inc.reference.<op>``, the spec.
* ``compiled`` — ``torch.compile(fullgraph=True, dynamic=False)`` of that same reference: what a user who
  does not take this library would run instead.

Modes
-----
``forward`` (inputs that need gradients, as in training, so the forward saves what its backward needs),
``backward`` (``torch.autograd.grad`` of one forward's output, ``retain_graph=True``, the forward outside
the timed region) and ``forward+backward``. Gradients are taken with ``torch.autograd.grad``, never
``.backward()``: nothing accumulates into ``.grad`` between repetitions.

Byte model (what an op must move at the very least)
---------------------------------------------------
Every input is read once and every output written once, in its own dtype (labels are int64, as the
trainer passes them). ``backward``: the forward's saved inputs and the upstream gradient are read once,
the gradients of the differentiable inputs written once (the upstream gradient of a scalar loss is not
counted). ``forward+backward``: the sum of the two. Recomputed intermediates, partial sums and anything
else a kernel chooses to move are not counted, so ``bytes / time`` is a lower bound of the traffic and
``% of copy bandwidth`` the share of the roofline the op reaches. Per op:

* cosine_mask   fwd: patches B·N·D + classes B·K·D + masks B·K·N;
                bwd: grad masks B·K·N + patches + classes + their two gradients.
                FLOPs: 2·B·K·N·D forward, 4·B·K·N·D backward (two batched products).
* fod_loss      fwd: student + teacher B·N·D + weight B·N (float32); bwd: the same + grad student.
* cds_dice_loss fwd: logits B·K·H·W + labels B·H·W; bwd: the same + grad logits.
* seg_head_loss fwd: masks B·K·h·w + labels B·H·W (+ image weight B); bwd: the same + grad masks.
* pseudo_label  fwd: teacher masks B·K_old·h·w + labels + thresholds K_old + pseudo-labels B·H·W (int64)
                + image factor B. No backward.
* loss_stage    pseudo_label forward, then seg_head_loss (forward, backward) on its pseudo-labels.
* mib_head_loss fwd: masks B·K·h·w + teacher masks B·K_old·h·w + labels B·H·W; bwd: the same + grad masks
                (MiB's unbiased CE + unbiased KD, timed as their sum, as --method mib trains with).

Which bound applies
-------------------
``memory``: fod_loss and cds_dice_loss (a few FLOPs and ≤ 1 exp per element read: on an H100 the
special-function units retire ~4·10¹² exp/s, ≥ 1 exp per byte of HBM traffic). ``roofline``: cosine_mask
is a batched matrix product whose arithmetic intensity (FLOPs / bytes above) is compared with the ridge
point of the device measured in the same run (matmul peak / copy bandwidth). ``compute``: the seg-head ops
(and mib_head_loss, the same walk)
read only the labels and the small patch-resolution masks but interpolate and exponentiate K values per
pixel (~15·K FLOPs + K exp per pixel against 8 bytes of label): bound by arithmetic, not by memory.
The bandwidth target applies to memory-bound rows only.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

import incrementer_fast as inc
from incrementer_fast.constants import IGNORE_INDEX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "backward", "forward+backward")
PROVIDERS = ("fused", "eager", "compiled")
SCALE = 10.0  # γ of the cosine masks: the model's default (incrementer_fast/model.py)
# The old-class counts of the paper's scenarios: VOC 15-5 (16 old incl. background of 21) and
# ADE20K 100-50 (101 old of 151). Tiny shapes use 3 of 5.
NUM_OLD = {21: 16, 151: 101, 5: 3}


@dataclass
class Inputs:
    """Tensors of one case: ``args`` are passed to the op call, ``differentiable`` get gradients."""

    args: tuple
    differentiable: tuple
    grad_output: torch.Tensor | None = None  # None: the output is a scalar loss (gradient 1)


@dataclass(frozen=True)
class Case:
    """One op at one size. ``dims`` are the shape parameters; ``size`` is ``paper``, ``small`` or ``tiny``."""

    op: str
    size: str
    title: str
    dims: tuple  # ((name, value), ...): hashable, ordered

    @property
    def d(self) -> dict:
        return dict(self.dims)

    @property
    def key(self) -> str:
        return f"{self.op}[{self.size}:" + ",".join(f"{k}={v}" for k, v in self.dims) + "]"

    @property
    def shape_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.dims)


@dataclass(frozen=True)
class OpSpec:
    name: str
    call: Callable  # call(ns, *args) -> the one tensor to time / differentiate; ns = inc or inc.reference
    make: Callable  # make(dims, device, dtype, generator) -> Inputs
    bytes: Callable  # bytes(dims, dtype, mode) -> int
    bound: str  # "memory" | "roofline" | "compute"
    modes: tuple = MODES
    flops: Callable | None = None  # flops(dims, mode) -> int, exact, where it is defined
    compare: str = "rel_err"  # how a fused forward is checked against eager: "rel_err" | "mismatch"
    targets: tuple = field(default=())  # extra targets (e.g. memory_20x): names understood by run.py


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


LABEL_BYTES = 8  # int64 labels, as the trainer passes them (labels.long())
F32 = 4


# Random inputs are drawn on the target device with a generator of that device: the paper shapes hold up to
# 317 M values, which the host would take seconds to draw and copy.
def _randn(shape, device, dtype, generator, std=1.0, requires_grad=False):
    x = (torch.randn(shape, generator=generator, dtype=torch.float32, device=device) * std).to(dtype)
    return x.requires_grad_(requires_grad)


def _labels(shape, num_classes, device, generator, ignore_fraction=0.05):
    """Uniform class labels with ``ignore_fraction`` of pixels set to ignore_index."""
    labels = torch.randint(0, num_classes, shape, generator=generator, device=device)
    ignored = torch.rand(shape, generator=generator, device=device) < ignore_fraction
    return labels.masked_fill(ignored, IGNORE_INDEX)


def _training_labels(shape, num_old, num_classes, device, generator):
    """Step-t training labels: 0 (background, which holds the old classes), a new class, or ignore."""
    u = torch.rand(shape, generator=generator, device=device)
    new = torch.randint(num_old, num_classes, shape, generator=generator, device=device)
    labels = torch.where(u < 0.6, 0, new)
    return labels.masked_fill(u > 0.95, IGNORE_INDEX)


# ----------------------------------------------------------------------------------- cosine_mask
def _cosine_mask_call(ns, patches, classes):
    return ns.cosine_mask(patches, classes, scale=SCALE)


def _cosine_mask_make(d, device, dtype, g):
    b, n, k, dim = d["B"], d["N"], d["K"], d["D"]
    patches = _randn((b, n, dim), device, dtype, g, requires_grad=True)
    classes = _randn((b, k, dim), device, dtype, g, requires_grad=True)
    grad = _randn((b, k, n), device, dtype, g)
    return Inputs((patches, classes), (patches, classes), grad)


def _cosine_mask_bytes(d, dtype, mode):
    s = _size(dtype)
    b, n, k, dim = d["B"], d["N"], d["K"], d["D"]
    fwd = (b * n * dim + b * k * dim + b * k * n) * s
    bwd = (b * k * n + 2 * (b * n * dim + b * k * dim)) * s
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def _cosine_mask_flops(d, mode):
    base = 2 * d["B"] * d["K"] * d["N"] * d["D"]
    return {"forward": base, "backward": 2 * base, "forward+backward": 3 * base}[mode]


# -------------------------------------------------------------------------------------- fod_loss
def _fod_call(ns, student, teacher, weight):
    return ns.fod_loss(student, teacher, weight)


def _fod_make(d, device, dtype, g):
    b, n, dim = d["B"], d["N"], d["D"]
    student = _randn((b, n, dim), device, dtype, g, requires_grad=True)
    teacher = _randn((b, n, dim), device, dtype, g)
    weight = torch.rand((b, n), generator=g, device=device)  # float32, as fod_token_weights returns
    return Inputs((student, teacher, weight), (student,))


def _fod_bytes(d, dtype, mode):
    s = _size(dtype)
    b, n, dim = d["B"], d["N"], d["D"]
    fwd = 2 * b * n * dim * s + b * n * F32
    bwd = fwd + b * n * dim * s
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


# --------------------------------------------------------------------------------- cds_dice_loss
def _dice_call(ns, logits, labels):
    return ns.cds_dice_loss(logits, labels, NUM_OLD[logits.shape[1]])


def _dice_make(d, device, dtype, g):
    b, k, h, w = d["B"], d["K"], d["H"], d["W"]
    logits = _randn((b, k, h, w), device, dtype, g, std=3.0, requires_grad=True)
    labels = _labels((b, h, w), k, device, g)
    return Inputs((logits, labels), (logits,))


def _dice_bytes(d, dtype, mode):
    s = _size(dtype)
    b, k, h, w = d["B"], d["K"], d["H"], d["W"]
    fwd = b * k * h * w * s + b * h * w * LABEL_BYTES
    bwd = fwd + b * k * h * w * s
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


# --------------------------------------------------------------------------------- seg_head_loss
def _seg_call(ns, masks, labels, image_weight):
    ce, dice = ns.seg_head_loss(masks, labels, NUM_OLD[masks.shape[1]], 1.0, IGNORE_INDEX, 1.0, image_weight)
    return ce + dice


def _seg_make(d, device, dtype, g):
    b, k, h, w, height, width = d["B"], d["K"], d["h"], d["w"], d["H"], d["W"]
    masks = _randn((b, k, h, w), device, dtype, g, std=3.0, requires_grad=True)
    labels = _labels((b, height, width), k, device, g)
    image_weight = torch.rand((b,), generator=g, device=device)
    return Inputs((masks, labels, image_weight), (masks,))


def _seg_bytes(d, dtype, mode):
    s = _size(dtype)
    b, k, h, w, height, width = d["B"], d["K"], d["h"], d["w"], d["H"], d["W"]
    fwd = b * k * h * w * s + b * height * width * LABEL_BYTES + b * F32
    bwd = fwd + b * k * h * w * s
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


# ---------------------------------------------------------------------------------- pseudo_label
def _pseudo_call(ns, teacher_masks, labels, thresholds):
    # K_total = K_old + 1: _pseudo_make's labels hold one new class.
    pseudo, _factor = ns.pseudo_label(teacher_masks, labels, thresholds, IGNORE_INDEX,
                                      num_classes=teacher_masks.shape[1] + 1)
    return pseudo


def _pseudo_make(d, device, dtype, g):
    b, k_old, h, w, height, width = d["B"], d["K_old"], d["h"], d["w"], d["H"], d["W"]
    teacher = _randn((b, k_old, h, w), device, dtype, g, std=3.0)
    labels = _training_labels((b, height, width), k_old, k_old + 1, device, g)
    thresholds = torch.full((k_old,), 0.5, device=device)
    return Inputs((teacher, labels, thresholds), ())


def _pseudo_bytes(d, dtype, mode):
    s = _size(dtype)
    b, k_old, h, w, height, width = d["B"], d["K_old"], d["h"], d["w"], d["H"], d["W"]
    return b * k_old * h * w * s + 2 * b * height * width * LABEL_BYTES + k_old * F32 + b * F32


# ------------------------------------------------------------------------------------ loss_stage
def _stage_call(ns, masks, teacher_masks, labels, thresholds):
    pseudo, factor = ns.pseudo_label(teacher_masks, labels, thresholds, IGNORE_INDEX, num_classes=masks.shape[1])
    # As in training: CE on the pseudo-labels, the dice's masks from the training labels.
    ce, dice = ns.seg_head_loss(masks, pseudo, teacher_masks.shape[1], 1.0, IGNORE_INDEX, 1.0, factor, labels)
    return ce + dice


def _stage_make(d, device, dtype, g):
    b, k, h, w, height, width = d["B"], d["K"], d["h"], d["w"], d["H"], d["W"]
    k_old = NUM_OLD[k]
    masks = _randn((b, k, h, w), device, dtype, g, std=3.0, requires_grad=True)
    teacher = _randn((b, k_old, h, w), device, dtype, g, std=3.0)
    labels = _training_labels((b, height, width), k_old, k, device, g)
    thresholds = torch.full((k_old,), 0.5, device=device)
    return Inputs((masks, teacher, labels, thresholds), (masks,))


def _stage_bytes(d, dtype, mode):
    s = _size(dtype)
    b, k, h, w, height, width = d["B"], d["K"], d["h"], d["w"], d["H"], d["W"]
    k_old = NUM_OLD[k]
    pseudo = _pseudo_bytes(dict(d, K_old=k_old), dtype, "forward")
    seg = _seg_bytes(d, dtype, mode)
    if mode == "backward":
        return seg
    return pseudo + seg


# --------------------------------------------------------------------------------- mib_head_loss
def _mib_call(ns, masks, teacher_masks, labels):
    unce, unkd = ns.mib_head_loss(masks, labels, teacher_masks.shape[1], teacher_masks, 1.0, IGNORE_INDEX)
    return unce + unkd


def _mib_make(d, device, dtype, g):
    b, k, h, w, height, width = d["B"], d["K"], d["h"], d["w"], d["H"], d["W"]
    k_old = NUM_OLD[k]
    masks = _randn((b, k, h, w), device, dtype, g, std=3.0, requires_grad=True)
    teacher = _randn((b, k_old, h, w), device, dtype, g, std=3.0)
    labels = _training_labels((b, height, width), k_old, k, device, g)
    return Inputs((masks, teacher, labels), (masks,))


def _mib_bytes(d, dtype, mode):
    s = _size(dtype)
    b, k, h, w, height, width = d["B"], d["K"], d["h"], d["w"], d["H"], d["W"]
    fwd = b * (k + NUM_OLD[k]) * h * w * s + b * height * width * LABEL_BYTES
    bwd = fwd + b * k * h * w * s
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


OPS: dict[str, OpSpec] = {
    "cosine_mask": OpSpec("cosine_mask", _cosine_mask_call, _cosine_mask_make, _cosine_mask_bytes, "roofline",
                          flops=_cosine_mask_flops),
    "fod_loss": OpSpec("fod_loss", _fod_call, _fod_make, _fod_bytes, "memory"),
    "cds_dice_loss": OpSpec("cds_dice_loss", _dice_call, _dice_make, _dice_bytes, "memory"),
    "seg_head_loss": OpSpec("seg_head_loss", _seg_call, _seg_make, _seg_bytes, "compute",
                            targets=("memory_20x",)),
    "pseudo_label": OpSpec("pseudo_label", _pseudo_call, _pseudo_make, _pseudo_bytes, "compute",
                           modes=("forward",), compare="mismatch"),
    "loss_stage": OpSpec("loss_stage", _stage_call, _stage_make, _stage_bytes, "compute",
                         targets=("memory_20x",)),
    "mib_head_loss": OpSpec("mib_head_loss", _mib_call, _mib_make, _mib_bytes, "compute",
                            targets=("memory_20x",)),
}

# Ops whose paper cases no exact extrapolation covers and which take too long to interpret in full. The
# seg-head kernels walk the masks cell by cell (kernels/seg_head.py): a single program issues ~10⁴ interpreted
# operations, the ~3,000 programs of a case would take hours, and their bands of cells break the per-row
# extrapolation of ledger_scale (its samples would need ≥ 2 bands of 8 cells). The dice's forward plans a few
# programs per SM, each sweeping a long run of pixel tiles, so its grid changes with the size (~30 min per
# paper case in full). So --size paper interprets PROGRAM_SAMPLE programs of each of their launches, drawn
# at random with a seed, and scales the counts to the grid: an estimate (the programs of a launch differ
# only at the edges), recorded per launch as ``sampled_programs``. The dice's last-program reduction then
# never runs (a few hundred additions, not counted).
PROGRAM_SAMPLED_OPS = ("seg_head_loss", "pseudo_label", "loss_stage", "mib_head_loss", "cds_dice_loss")
PROGRAM_SAMPLE = 4


def _case(op, size, title, **dims):
    return Case(op, size, title, tuple(dims.items()))


def cases(size: str) -> list[Case]:
    """The cases of one size, in the order they are reported.

    ``paper``: ViT-B/16 at 512², batch 8 (N = 1024 patches, D = 768), VOC (K = 21) and ADE20K (K = 151).
    ``small``: CPU-friendly shapes for pytest-benchmark on a laptop. ``tiny``: the ``--quick`` smoke run.
    """
    if size == "paper":
        # ADE20K's K = 151 first (the memory target, fused ≥ 20× below eager, is stated there), VOC's K = 21
        # last: a run cut short by its time budget keeps the cases that matter most.
        vit = dict(B=8, N=1024, D=768)
        img = dict(B=8, H=512, W=512)
        seg = dict(B=8, h=32, w=32, H=512, W=512)
        return [
            _case("cosine_mask", size, "ViT-B/16 512² b8 K=151", **vit, K=151),
            _case("fod_loss", size, "ViT-B/16 512² b8 patch tokens", **vit),
            _case("cds_dice_loss", size, "logits 512² b8 K=151", **img, K=151),
            _case("seg_head_loss", size, "masks 32² → 512² b8 K=151", K=151, **seg),
            _case("loss_stage", size, "pseudo-labels + seg head, 512² b8 K=151", K=151, **seg),
            _case("pseudo_label", size, "teacher 32² → 512² b8 K_old=101", K_old=101, **seg),
            _case("mib_head_loss", size, "masks 32² → 512² b8 K=151, teacher K_old=101", K=151, **seg),
            _case("cosine_mask", size, "ViT-B/16 512² b8 K=21", **vit, K=21),
            _case("cds_dice_loss", size, "logits 512² b8 K=21", **img, K=21),
            _case("seg_head_loss", size, "masks 32² → 512² b8 K=21", K=21, **seg),
        ]
    if size == "small":
        return [
            _case("cosine_mask", size, "small K=21", B=2, N=256, D=192, K=21),
            _case("fod_loss", size, "small", B=2, N=256, D=192),
            _case("cds_dice_loss", size, "small K=21", B=2, H=128, W=128, K=21),
            _case("seg_head_loss", size, "small K=21", K=21, B=2, h=8, w=8, H=128, W=128),
            _case("pseudo_label", size, "small K_old=16", K_old=16, B=2, h=8, w=8, H=128, W=128),
            _case("loss_stage", size, "small K=21", K=21, B=2, h=8, w=8, H=128, W=128),
            _case("mib_head_loss", size, "small K=21", K=21, B=2, h=8, w=8, H=128, W=128),
        ]
    if size == "tiny":
        return [
            _case("cosine_mask", size, "tiny K=5", B=2, N=64, D=32, K=5),
            _case("fod_loss", size, "tiny", B=2, N=64, D=32),
            _case("cds_dice_loss", size, "tiny K=5", B=2, H=32, W=32, K=5),
            _case("seg_head_loss", size, "tiny K=5", K=5, B=2, h=4, w=4, H=32, W=32),
            _case("pseudo_label", size, "tiny K_old=3", K_old=3, B=2, h=4, w=4, H=32, W=32),
            _case("loss_stage", size, "tiny K=5", K=5, B=2, h=4, w=4, H=32, W=32),
            _case("mib_head_loss", size, "tiny K=5", K=5, B=2, h=4, w=4, H=32, W=32),
        ]
    raise ValueError(f"size must be paper, small or tiny, got {size!r}")


def make_inputs(case: Case, device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return OPS[case.op].make(case.d, device, dtype, generator)


def fused_is_reference(op: str) -> bool:
    """True while ``inc.<op>`` is still a re-export of the reference (its kernels have not landed)."""
    names = {"loss_stage": ("pseudo_label", "seg_head_loss")}.get(op, (op,))
    return all(getattr(inc, n) is getattr(inc.reference, n) for n in names)


def set_compile_limits() -> None:
    """Every case compiles its own graph: lift Dynamo's per-function recompile limit so that none falls
    back to eager silently (run.py also resets Dynamo between cases)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 1024)


def build(op: str, provider: str, compile_backend: str = "inductor") -> Callable:
    """The callable ``f(*args) -> tensor`` of ``op`` for ``provider``."""
    spec = OPS[op]
    if provider == "fused":
        return functools.partial(spec.call, inc)
    if provider == "eager":
        return functools.partial(spec.call, inc.reference)
    if provider == "compiled":
        set_compile_limits()
        return torch.compile(functools.partial(spec.call, inc.reference), backend=compile_backend,
                             fullgraph=True, dynamic=False)
    raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")


def mode_fn(fn: Callable, inputs: Inputs, mode: str) -> Callable:
    """The zero-argument callable that one timed repetition of ``mode`` runs."""
    if mode == "forward":
        return lambda: fn(*inputs.args)
    if mode == "forward+backward":
        return lambda: torch.autograd.grad(fn(*inputs.args), inputs.differentiable, inputs.grad_output)
    if mode == "backward":
        output = fn(*inputs.args)
        return lambda: torch.autograd.grad(output, inputs.differentiable, inputs.grad_output, retain_graph=True)
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


# ------------------------------------------------------------------------------- training step
@dataclass(frozen=True)
class StepCase:
    """A whole incremental training step: teacher forward, student forward, every loss, backward."""

    backbone: str
    image_size: int
    batch: int
    num_old: int
    num_new: int
    title: str


STEP_CASES = {
    "paper": StepCase("vit_base_patch16_384", 512, 8, 101, 50, "ViT-B/16 512² b8, ADE 100-50 step (K=151)"),
    "tiny": StepCase("vit_tiny_patch16_224", 32, 2, 3, 2, "ViT-Ti/16 32² b2, K=5"),
}


class TrainingStep:
    """Builds the student (with ``num_old + num_new`` classes), its frozen teacher and one batch, and runs
    ``incrementer_fast.continual.train.compute_losses`` — the trainer's own loss — with the fused ops
    (``fused=True``) or the reference ops everywhere (model's cosine mask, seg head, pseudo-labels, FOD,
    dice). ``amp_dtype`` (bf16) runs the networks under autocast, as the trainer does on CUDA."""

    def __init__(self, case: StepCase, device, fused: bool, amp_dtype: torch.dtype | None, seed: int = 0):
        from incrementer_fast.continual.config import TrainConfig
        from incrementer_fast.continual.train import make_pseudo_labeler
        from incrementer_fast.model import Incrementer

        self.case = case
        self.device = torch.device(device)
        self.fused = fused
        self.amp_dtype = amp_dtype
        torch.manual_seed(seed)
        model = Incrementer(case.backbone, case.num_old, img_size=case.image_size)
        self.teacher = model.frozen_copy().to(self.device)
        model.add_classes(case.num_new)
        self.model = model.to(self.device).train()
        self.config = TrainConfig(fused_head=fused)
        g = torch.Generator(device=self.device).manual_seed(seed)
        size = (case.batch, case.image_size, case.image_size)
        self.images = torch.randn((case.batch, 3, case.image_size, case.image_size), generator=g, device=self.device)
        self.labels = _training_labels(size, case.num_old, case.num_old + case.num_new, self.device, g)
        thresholds = torch.full((case.num_old,), 0.5, device=self.device)
        self.pseudo_labeler = make_pseudo_labeler(self.config, case.num_old + case.num_new, thresholds)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def attention_backend(self) -> str:
        from incrementer_fast.attention import resolve_backend

        return resolve_backend(self.device, self.amp_dtype or torch.float32)

    def __call__(self) -> torch.Tensor:
        from incrementer_fast.continual.train import compute_losses

        # The reference variant: every op on its plain-PyTorch reference (the model's cosine mask, FOD, the
        # dice), and TrainConfig(fused_head=False) takes the references of the seg-head loss and pseudo-labels.
        with inc.use_backend("auto" if self.fused else "reference"):
            self.model.zero_grad(set_to_none=True)
            with torch.no_grad(), self._autocast():
                teacher_out = self.teacher(self.images)
            with self._autocast():
                student_out = self.model(self.images)
            terms = compute_losses(self.config, student_out, self.labels, num_old=self.case.num_old,
                                   patch_size=self.model.patch_size, teacher=teacher_out,
                                   pseudo_labeler=self.pseudo_labeler)
            terms.total.backward()
        return terms.total.detach()
