"""Parity tests of mib_head_loss (MiB's unbiased CE and unbiased distillation from patch-resolution masks):
against an independent transcription of MiB's two loss classes (fcdl94/MiB, utils/loss.py) in float64, and
against the float64 reference, which materialises the upsampled logits.

Run on the CPU without TRITON_INTERPRET (the op dispatches to the reference), with TRITON_INTERPRET=1 (the
kernels through the interpreter, with the interpreter's and a GPU's launch plans) and on CUDA when present.
Shapes stay small (h, w ≤ 6, H, W ≤ 16): the interpreter runs every Triton op in Python.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from helpers import assert_close_rel
from hypothesis import given, settings
from hypothesis import strategies as st
from test_seg_head import LAYOUTS, make_labels, make_masks
from torch.utils._python_dispatch import TorchDispatchMode

import incrementer_fast as inc
from incrementer_fast import reference
from incrementer_fast._dispatch import INTERPRET

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
IGNORE = 255
# Each example walks its cells through the interpreter: at most 4 examples there.
FEWER_EXAMPLES_INTERPRETED = settings(max_examples=min(4, settings.default.max_examples)) if INTERPRET else settings()


# --------------------------------------------------------------------------- MiB, transcribed independently
class MiBUnbiasedCE:
    """MiB's UnbiasedCrossEntropy (reduction mean) as its forward reads: log-probabilities where channel 0
    holds log p(background or any old class), channels ≥ old_cl the new classes' log p, the channels in
    between stay 0; labels below old_cl become 0; then nll_loss with ignore_index."""

    def __init__(self, old_cl, ignore_index=IGNORE):
        self.old_cl, self.ignore_index = old_cl, ignore_index

    def __call__(self, inputs, targets):
        log_probs = torch.zeros_like(inputs)
        normaliser = torch.logsumexp(inputs, dim=1)
        log_probs[:, 0] = torch.logsumexp(inputs[:, :self.old_cl], dim=1) - normaliser
        log_probs[:, self.old_cl:] = inputs[:, self.old_cl:] - normaliser.unsqueeze(1)
        labels = targets.clone()
        labels[targets < self.old_cl] = 0
        return F.nll_loss(log_probs, labels, ignore_index=self.ignore_index, reduction="mean")


class MiBUnbiasedKD:
    """MiB's UnbiasedKnowledgeDistillationLoss (reduction mean, no mask): the teacher's softmax of alpha·logits
    against the student's log-probabilities where the new classes join the background; summed over the
    teacher's classes and divided by their count; minus the mean over pixels."""

    def __init__(self, alpha=1.0):
        self.alpha = alpha

    def __call__(self, inputs, targets):
        old = targets.shape[1]
        background_and_new = torch.tensor([0] + list(range(old, inputs.shape[1])), device=inputs.device)
        normaliser = torch.logsumexp(inputs, dim=1)
        old_log_probs = inputs[:, 1:old] - normaliser.unsqueeze(1)
        background_log_prob = torch.logsumexp(inputs.index_select(1, background_and_new), dim=1) - normaliser
        soft = torch.softmax(targets * self.alpha, dim=1)
        per_pixel = (soft[:, 0] * background_log_prob + (soft[:, 1:] * old_log_probs).sum(1)) / old
        return -per_pixel.mean()


def _upsample(masks, size):
    return F.interpolate(masks.double(), size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_classes, num_old, alpha", [(6, 3, 1.0), (5, 1, 0.7), (151, 101, 1.0)])
def test_matches_mibs_own_losses_in_float64(device, num_classes, num_old, alpha):
    """MiB's losses on the upsampled logits = mib_head_loss (and its reference) ≤ 1e-10, values and gradients;
    labels from {0} ∪ [1, num_old) ∪ [num_old, K) ∪ {ignore}, as MiB's own remapping sees them."""
    generator = torch.Generator().manual_seed(num_classes)
    # K = 151 on one image of 2 × 2 cells: its class chunks are what it adds (test_ade_classes_in_fp32 has more).
    batch, h = (1, 2) if num_classes > 100 else (2, 3)
    masks = make_masks((batch, num_classes, h, 2), torch.float64, device, "channels_last", 3.0, generator)
    teacher = make_masks((batch, num_old, h, 2), torch.float64, device, "transposed", 2.0, generator)
    labels = make_labels((batch, 7, 5), num_classes, "random", torch.int64, device, generator)
    size = tuple(labels.shape[1:])
    for path in (inc, reference):
        student = masks.detach().requires_grad_(True)
        unce, unkd = path.mib_head_loss(student, labels, num_old, teacher, kd_alpha=alpha)
        grad, = torch.autograd.grad(unce + 3.0 * unkd, student)
        mib_student = masks.detach().contiguous().requires_grad_(True)
        logits = _upsample(mib_student, size)
        mib_ce = MiBUnbiasedCE(num_old)(logits, labels)
        mib_kd = MiBUnbiasedKD(alpha)(logits, _upsample(teacher, size))
        mib_grad, = torch.autograd.grad(mib_ce + 3.0 * mib_kd, mib_student)
        assert_close_rel(unce, mib_ce, torch.float64, f"{path.__name__} unce")
        assert_close_rel(unkd, mib_kd, torch.float64, f"{path.__name__} unkd")
        assert_close_rel(grad, mib_grad, torch.float64, f"{path.__name__} grad")


def _loss_and_grad(path, masks, labels, num_old, teacher, weights, **kwargs):
    leaf = masks.detach().requires_grad_(True)
    unce, unkd = path.mib_head_loss(leaf, labels, num_old, teacher, **kwargs)
    grad, = torch.autograd.grad(weights[0] * unce + weights[1] * unkd, leaf)
    return unce.detach(), unkd.detach(), grad


def _reference_loss_and_grad(masks, labels, num_old, teacher, weights, **kwargs):
    """The reference in float64 (the masks' and teacher's values, exactly)."""
    teacher = None if teacher is None else teacher.double()
    return _loss_and_grad(reference, masks.double(), labels, num_old, teacher, weights, **kwargs)


@st.composite
def mib_cases(draw):
    num_classes = draw(st.sampled_from([2, 3, 5, 9, 33]))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    if draw(st.booleans()):
        multiple = draw(st.integers(1, 3))
        height, width = h * multiple, w * multiple
    else:  # not multiples (down-sampling included)
        height, width = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    return dict(
        batch=draw(st.integers(1, 2)), num_classes=num_classes, num_old=draw(st.integers(1, num_classes - 1)),
        h=h, w=w, height=height, width=width,
        dtype=draw(st.sampled_from(FLOATS)),
        layout=draw(st.sampled_from(LAYOUTS)), teacher_layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from([0.0, 1.0, 8.0])),
        labels_kind=draw(st.sampled_from(["random", "all_ignore_image", "all_ignore", "background_heavy",
                                          "out_of_range"])),
        labels_dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.uint8])),
        labels_transposed=draw(st.booleans()),
        teacher=draw(st.booleans()),
        kd_alpha=draw(st.sampled_from([1.0, 0.3, 2.0])),
        weights=draw(st.sampled_from([(1.0, 1.0), (1.0, 0.0), (0.0, 10.0)])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("device", DEVICES)
@FEWER_EXAMPLES_INTERPRETED
@given(case=mib_cases())
def test_mib_head_loss_matches_reference(device, case):
    generator = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["num_classes"], case["h"], case["w"])
    dtype = case["dtype"]
    masks = make_masks(shape, dtype, device, case["layout"], case["scale"], generator)
    teacher = None
    if case["teacher"]:
        teacher = make_masks((case["batch"], case["num_old"], case["h"], case["w"]), dtype, device,
                             case["teacher_layout"], 2.0, generator)
    labels = make_labels((case["batch"], case["height"], case["width"]), case["num_classes"], case["labels_kind"],
                         case["labels_dtype"], device, generator, case["labels_transposed"])
    args = (labels, case["num_old"], teacher, case["weights"])
    unce, unkd, grad = _loss_and_grad(inc, masks, *args, kd_alpha=case["kd_alpha"])
    ref_unce, ref_unkd, ref_grad = _reference_loss_and_grad(masks, *args, kd_alpha=case["kd_alpha"])
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert unce.shape == unkd.shape == () and unce.dtype == unkd.dtype == expected_dtype
    assert grad.dtype == dtype and grad.shape == masks.shape
    bound_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_rel(unce, ref_unce, bound_dtype, "unce")
    assert_close_rel(unkd, ref_unkd, bound_dtype, "unkd")
    assert_close_rel(grad, ref_grad, dtype, "grad of masks")
    if teacher is None:
        assert unkd.item() == 0.0
    if case["labels_kind"] == "all_ignore":
        assert unce.item() == 0.0
        if teacher is None or case["weights"][1] == 0.0:
            assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_ade_classes_in_fp32(device):
    """K = 151 (ADE20K, 100 old): several class chunks of the GPU plans' forward and backward."""
    generator = torch.Generator().manual_seed(3)
    masks = make_masks((2, 151, 2, 3), torch.float32, device, "contiguous", 4.0, generator)
    teacher = make_masks((2, 101, 2, 3), torch.float32, device, "strided", 3.0, generator)
    labels = make_labels((2, 5, 7), 151, "random", torch.int64, device, generator)
    unce, unkd, grad = _loss_and_grad(inc, masks, labels, 101, teacher, (1.0, 10.0))
    ref_unce, ref_unkd, ref_grad = _reference_loss_and_grad(masks, labels, 101, teacher, (1.0, 10.0))
    assert_close_rel(unce, ref_unce, torch.float32, "unce")
    assert_close_rel(unkd, ref_unkd, torch.float32, "unkd")
    assert_close_rel(grad, ref_grad, torch.float32, "grad of masks")


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_is_zero_not_nan(device):
    """No counted pixel: unce = 0 with zero gradients (MiB's mean would be NaN); unkd still counts every pixel."""
    masks = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.full((2, 5, 5), IGNORE, device=device)
    unce, unkd = inc.mib_head_loss(masks, labels, 2)
    unce.backward()
    assert unce.item() == 0.0 and unkd.item() == 0.0 and torch.count_nonzero(masks.grad) == 0
    teacher = torch.randn(2, 2, 3, 3, dtype=torch.float64, device=device)
    unce, unkd = inc.mib_head_loss(masks, labels, 2, teacher)
    assert unce.item() == 0.0 and torch.isfinite(unkd) and unkd.item() != 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_zero_losses(device):
    for path in (inc, reference):
        masks = torch.randn(0, 4, 3, 3, device=device, requires_grad=True)
        unce, unkd = path.mib_head_loss(masks, torch.zeros(0, 6, 6, dtype=torch.long, device=device), 2,
                                        torch.randn(0, 2, 3, 3, device=device))
        (unce + unkd).backward()
        assert unce.item() == 0.0 and unkd.item() == 0.0 and masks.grad.shape == masks.shape


@pytest.mark.parametrize("device", DEVICES)
def test_mib_head_loss_is_deterministic(device):
    generator = torch.Generator().manual_seed(11)
    masks = make_masks((2, 13, 2, 3), torch.float32, device, "channels_last", 3.0, generator)
    teacher = make_masks((2, 6, 2, 3), torch.float32, device, "contiguous", 3.0, generator)
    labels = make_labels((2, 5, 7), 13, "random", torch.int64, device, generator)
    first = _loss_and_grad(inc, masks, labels, 6, teacher, (1.0, 10.0))
    second = _loss_and_grad(inc, masks, labels, 6, teacher, (1.0, 10.0))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_mib_head_loss_gradcheck():
    generator = torch.Generator().manual_seed(7)
    # 6 mask values: 12 forward passes of the numerical Jacobian (slow under the interpreter).
    masks = make_masks((1, 3, 2, 1), torch.float64, "cpu", "transposed", 1.5, generator).requires_grad_(True)
    teacher = make_masks((1, 2, 2, 1), torch.float64, "cpu", "contiguous", 1.5, generator)
    labels = make_labels((1, 5, 4), 3, "random", torch.int64, "cpu", generator)

    def loss(m):
        unce, unkd = inc.mib_head_loss(m, labels, 2, teacher, kd_alpha=0.5)
        return unce + 2.0 * unkd

    assert torch.autograd.gradcheck(loss, (masks,))


def test_mib_head_ops_opcheck(kernel_device):
    device = kernel_device
    generator = torch.Generator().manual_seed(9)
    # One image of 2 × 1 cells, 3 × 2 pixels: opcheck runs each op many times.
    masks = make_masks((1, 5, 2, 1), torch.float32, device, "transposed", 2.0, generator).requires_grad_(True)
    teacher = make_masks((1, 3, 2, 1), torch.float32, device, "contiguous", 2.0, generator)
    labels = make_labels((1, 3, 2), 5, "background_heavy", torch.int32, device, generator)
    ops = torch.ops.incrementer_fast
    for with_teacher in (None, teacher):
        torch.library.opcheck(ops.mib_head_loss_sums.default, (masks, labels, with_teacher, 3, 1.0, IGNORE))
        _, pixel_stats = ops.mib_head_loss_sums(masks.detach(), labels, with_teacher, 3, 1.0, IGNORE)
        grad_sums = torch.randn(1, 3, device=device)
        torch.library.opcheck(ops.mib_head_loss_sums_backward.default,
                              (grad_sums, masks.detach(), labels, with_teacher, pixel_stats, 3, 1.0, IGNORE))


def test_backward_reads_stride_zero_gradients(kernel_device):
    """A `.sum()`-style gradient of the sums arrives expanded (stride 0 along the images or the sums): the
    backward reads it in place and gives the gradient of the same values laid out densely."""
    from incrementer_fast.kernels import mib_head_loss as kernels

    generator = torch.Generator().manual_seed(21)
    masks = make_masks((2, 7, 3, 2), torch.float32, kernel_device, "contiguous", 2.0, generator)
    teacher = make_masks((2, 4, 3, 2), torch.float32, kernel_device, "channels_last", 2.0, generator)
    labels = make_labels((2, 6, 5), 7, "random", torch.int64, kernel_device, generator)
    _, stats = kernels.mib_head_loss_forward(masks, labels, teacher, 4, 1.0, IGNORE)
    for grad_sums in (torch.randn(1, 3, device=kernel_device).expand(2, 3),
                      torch.randn(2, 1, device=kernel_device).expand(2, 3)):
        grad = kernels.mib_head_loss_backward(grad_sums, masks, labels, teacher, stats, 4, 1.0, IGNORE)
        dense = kernels.mib_head_loss_backward(grad_sums.contiguous(), masks, labels, teacher, stats, 4, 1.0, IGNORE)
        assert grad_sums.stride().count(0) == 1 and torch.equal(grad, dense)


def test_kernels_give_the_same_results_in_bands_of_two_cells(kernel_device):
    """Bands of 2 × 2 cells over 5 × 3 masks (partial bands, rows down-sampled 5 → 4): the per-pixel stats
    and gradient of the default bands bit for bit, the sums up to their order."""
    from incrementer_fast.kernels import mib_head_loss as kernels

    generator = torch.Generator().manual_seed(23)
    masks = make_masks((1, 6, 5, 3), torch.float32, kernel_device, "strided", 3.0, generator)
    teacher = make_masks((1, 3, 5, 3), torch.float32, kernel_device, "contiguous", 3.0, generator)
    labels = make_labels((1, 4, 7), 6, "background_heavy", torch.int64, kernel_device, generator)
    sums, stats = kernels.mib_head_loss_forward(masks, labels, teacher, 3, 1.0, IGNORE)
    band_sums, band_stats = kernels.mib_head_loss_forward(masks, labels, teacher, 3, 1.0, IGNORE, band=2)
    assert torch.equal(stats, band_stats)
    assert_close_rel(band_sums, sums, torch.float32, "sums")
    grad_sums = torch.randn(1, 3, generator=generator).to(kernel_device)
    grad = kernels.mib_head_loss_backward(grad_sums, masks, labels, teacher, stats, 3, 1.0, IGNORE)
    assert torch.equal(grad, kernels.mib_head_loss_backward(grad_sums, masks, labels, teacher, stats, 3, 1.0,
                                                            IGNORE, band=2))


class _LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_tensor_of_pixel_logits_in_forward_or_backward(kernel_device):
    """The kernel path never makes a tensor of B·K·H·W elements (the reference does: the check sees it);
    its largest are the 5 per-pixel stats and the masks-sized gradient."""
    generator = torch.Generator().manual_seed(5)
    batch, num_classes, height, width = 2, 12, 12, 10
    masks = make_masks((batch, num_classes, 3, 2), torch.float32, kernel_device, "contiguous", 2.0, generator)
    teacher = make_masks((batch, 6, 3, 2), torch.float32, kernel_device, "contiguous", 2.0, generator)
    labels = make_labels((batch, height, width), num_classes, "random", torch.int64, kernel_device, generator)
    pixel_logits = batch * num_classes * height * width
    for path, expect_logits in ((inc, False), (reference, True)):
        leaf = masks.detach().requires_grad_(True)
        with _LargestTensor() as seen:
            unce, unkd = path.mib_head_loss(leaf, labels, 6, teacher)
            (unce + 10 * unkd).backward()
        assert (seen.largest >= pixel_logits) == expect_logits, (path.__name__, seen.largest)
        if not expect_logits:
            assert seen.largest <= 5 * batch * height * width


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda m, l, t: inc.mib_head_loss(m[0], l, 2), ValueError, ["masks", "(B, K, h, w)"]),
        (lambda m, l, t: inc.mib_head_loss(m, l.float(), 2), TypeError, ["labels"]),
        (lambda m, l, t: inc.mib_head_loss(m, l, 4), ValueError, ["num_old", "K = 4"]),
        (lambda m, l, t: inc.mib_head_loss(m, l, 0), ValueError, ["num_old"]),
        (lambda m, l, t: inc.mib_head_loss(m, l, 3, t), ValueError, ["teacher_masks", "(2, 3, 3, 3)"]),
        (lambda m, l, t: inc.mib_head_loss(m, l, 2, t[:, :, :2]), ValueError, ["teacher_masks", "(B, num_old, h, w)"]),
        (lambda m, l, t: inc.mib_head_loss(m, l, 2, t.long()), TypeError, ["teacher_masks"]),
        (lambda m, l, t: inc.mib_head_loss(m, l, 2, t, kd_alpha=float("nan")), ValueError, ["kd_alpha"]),
        (lambda m, l, t: inc.mib_head_loss(m, l, 2, t, kd_alpha="1"), TypeError, ["kd_alpha"]),
        (lambda m, l, t: inc.mib_head_loss(m, l.to(torch.uint8), 2, ignore_index=-1), ValueError, ["ignore_index"]),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, error, words):
    masks = torch.randn(2, 4, 3, 3)
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    teacher = torch.randn(2, 2, 3, 3)
    with pytest.raises(error) as info:
        call(masks, labels, teacher)
    for word in words:
        assert word in str(info.value)
