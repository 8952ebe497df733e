"""Parity tests of the fused segmentation head (seg_head_loss, entropy_histogram, pseudo_label) against the
float64 reference, which materialises the upsampled logits.

Run on the CPU without TRITON_INTERPRET (the ops dispatch to the reference: its properties are checked) and
with TRITON_INTERPRET=1 (the Triton kernels run through the interpreter, with the interpreter's and a GPU's
launch plans); on a CUDA machine every test also runs on the GPU. Shapes stay small (h, w ≤ 8, H, W ≤ 24):
the interpreter runs every Triton op in Python.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, fewer_examples_interpreted
from hypothesis import given
from hypothesis import strategies as st

import incrementer_fast as inc
from incrementer_fast import reference
from incrementer_fast.reference.seg_head import teacher_prediction
from conftest import DEVICES
FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]
IGNORE = 255


# Under the interpreter every example walks each cell of its masks through Triton's interpreter (tens of ms a
# cell).
FEWER_EXAMPLES_INTERPRETED = fewer_examples_interpreted()


def make_masks(shape, dtype, device, layout, scale, generator):
    """Patch-resolution masks of logical shape (B, K, h, w) in the given memory layout."""
    batch, num_classes, h, w = shape
    if layout == "channels_last":
        physical, to_logical = (batch, h, w, num_classes), lambda t: t.permute(0, 3, 1, 2)
    elif layout == "transposed":
        physical, to_logical = (batch, num_classes, w, h), lambda t: t.transpose(2, 3)
    elif layout == "strided":
        physical, to_logical = (batch, 2 * num_classes, h, w), lambda t: t[:, ::2]
    else:
        physical, to_logical = shape, lambda t: t
    data = torch.randn(physical, generator=generator, dtype=torch.float64) * scale
    masks = to_logical(data.to(dtype).to(device))
    assert masks.shape == tuple(shape)
    return masks


def make_labels(shape, num_classes, kind, dtype, device, generator, transposed=False):
    """Labels (B, H, W) in [0, K) with ~20 % ignored, plus the edge cases all-ignore image / batch and
    values outside [0, K) that are not ignore_index (which the ops treat as ignore_index)."""
    labels = torch.randint(0, num_classes, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.2] = IGNORE
    if kind == "all_ignore_image":
        labels[0] = IGNORE
    elif kind == "all_ignore":
        labels[:] = IGNORE
    elif kind == "background_heavy":  # PLOP's case: most pixels are background (label 0)
        labels[torch.rand(shape, generator=generator) < 0.6] = 0
    elif kind == "out_of_range":  # K ≤ value < 255, and −1 where the dtype is signed
        outside = torch.rand(shape, generator=generator) < 0.2
        labels[outside] = torch.randint(num_classes, IGNORE, shape, generator=generator)[outside]
        if dtype != torch.uint8:
            labels[torch.rand(shape, generator=generator) < 0.1] = -1
    labels = labels.to(dtype)
    if transposed:
        labels = labels.transpose(1, 2).contiguous().transpose(1, 2)
    return labels.to(device)


def reference_loss_and_grad(masks, labels, num_old, weights, **kwargs):
    """(ce, dice, grad of masks for the loss weights[0]·ce + weights[1]·dice), all in float64."""
    leaf = masks.detach().double().requires_grad_(True)
    image_weight = kwargs.pop("image_weight", None)
    if image_weight is not None:
        image_weight = image_weight.double()
    ce, dice = reference.seg_head_loss(leaf, labels, num_old, image_weight=image_weight, **kwargs)
    (grad,) = torch.autograd.grad(weights[0] * ce + weights[1] * dice, leaf)
    return ce.detach(), dice.detach(), grad


def fused_loss_and_grad(masks, labels, num_old, weights, **kwargs):
    leaf = masks.detach().requires_grad_(True)
    ce, dice = inc.seg_head_loss(leaf, labels, num_old, **kwargs)
    (grad,) = torch.autograd.grad(weights[0] * ce + weights[1] * dice, leaf)
    return ce, dice, grad


@st.composite
def seg_head_cases(draw):
    num_classes = draw(st.sampled_from([2, 3, 5, 7, 16, 31, 40]))
    h = draw(st.integers(1, 8))
    w = draw(st.integers(1, 8))
    factor = draw(st.sampled_from(["one", "integer", "any"]))
    if factor == "one":
        height, width = h, w
    elif factor == "integer":
        multiple = draw(st.integers(2, 3))
        height, width = h * multiple, w * multiple
    else:  # H, W not multiples of h, w (down-sampling included)
        height = draw(st.integers(1, 24))
        width = draw(st.integers(1, 24))
    return dict(
        batch=draw(st.integers(1, 3)),
        num_classes=num_classes,
        num_old=draw(st.integers(1, num_classes - 1)),
        h=h, w=w, height=height, width=width,
        dtype=draw(st.sampled_from(FLOATS)),
        layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from([0.0, 1.0, 8.0])),
        labels_kind=draw(st.sampled_from(["random", "all_ignore_image", "all_ignore", "background_heavy",
                                          "out_of_range"])),
        dice_labels_kind=draw(st.sampled_from([None, "random", "background_heavy"])),
        labels_dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.uint8])),
        labels_transposed=draw(st.booleans()),
        new_class_weight=draw(st.sampled_from([1.0, 0.3, 2.5, 0.0])),
        smooth=draw(st.sampled_from([1.0, 0.5])),
        use_image_weight=draw(st.booleans()),
        weights=draw(st.sampled_from([(1.0, 1.0), (0.7, 0.0), (0.0, 1.3)])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("device", DEVICES)
@FEWER_EXAMPLES_INTERPRETED
@given(case=seg_head_cases())
def test_seg_head_loss_matches_reference(device, case):
    generator = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["num_classes"], case["h"], case["w"])
    dtype = case["dtype"]
    masks = make_masks(shape, dtype, device, case["layout"], case["scale"], generator)
    labels = make_labels(
        (case["batch"], case["height"], case["width"]), case["num_classes"], case["labels_kind"],
        case["labels_dtype"], device, generator, case["labels_transposed"],
    )
    image_weight = torch.rand(case["batch"], generator=generator).to(device) if case["use_image_weight"] else None
    dice_labels = None
    if case["dice_labels_kind"] is not None:  # the step's ground truth beside pseudo-labels, as in training
        dice_labels = make_labels(labels.shape, case["num_classes"], case["dice_labels_kind"], torch.int64,
                                  device, generator)
    kwargs = dict(new_class_weight=case["new_class_weight"], smooth=case["smooth"], image_weight=image_weight,
                  dice_labels=dice_labels)
    ce, dice, grad = fused_loss_and_grad(masks, labels, case["num_old"], case["weights"], **kwargs)
    ref_ce, ref_dice, ref_grad = reference_loss_and_grad(masks, labels, case["num_old"], case["weights"], **kwargs)

    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ce.shape == () and dice.shape == () and ce.dtype == dice.dtype == expected_dtype
    assert grad.dtype == dtype and grad.shape == masks.shape
    # ce and dice are computed from the (exactly representable) low-precision masks in fp32: fp32 bounds.
    bound_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_rel(ce, ref_ce, bound_dtype, "ce")
    assert_close_rel(dice, ref_dice, bound_dtype, "dice")
    assert_close_rel(grad, ref_grad, dtype, "grad of masks")
    if case["labels_kind"] == "all_ignore":
        assert ce.item() == 0.0
        if case["dice_labels_kind"] is None:  # nothing counts in the dice either
            assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_seg_head_loss_ade_classes(device):
    """K = 151 (ADE20K): more than one class chunk on the GPU; tiny spatial size."""
    generator = torch.Generator().manual_seed(3)
    masks = make_masks((2, 151, 3, 2), torch.float32, device, "contiguous", 4.0, generator)
    labels = make_labels((2, 7, 5), 151, "random", torch.int64, device, generator)
    kwargs = dict(new_class_weight=2.0, image_weight=torch.tensor([0.25, 1.0], device=device))
    ce, dice, grad = fused_loss_and_grad(masks, labels, 101, (1.0, 0.5), **kwargs)
    ref_ce, ref_dice, ref_grad = reference_loss_and_grad(masks, labels, 101, (1.0, 0.5), **kwargs)
    assert_close_rel(ce, ref_ce, torch.float32, "ce")
    assert_close_rel(dice, ref_dice, torch.float32, "dice")
    assert_close_rel(grad, ref_grad, torch.float32, "grad of masks")


@pytest.mark.parametrize("device", DEVICES)
def test_seg_head_loss_ce_is_plops_mean_over_all_pixels(device):
    """ce = F.cross_entropy(weight=…, reduction="none") × image factor, then .mean() (PLOP's train.py): ignored
    pixels count in the mean, so w_new scales the loss even when every counted pixel is new."""
    generator = torch.Generator().manual_seed(5)
    masks = make_masks((2, 6, 4, 3), torch.float64, device, "contiguous", 2.0, generator)
    labels = make_labels((2, 9, 10), 6, "random", torch.int64, device, generator)
    image_weight = torch.tensor([0.5, 0.75], dtype=torch.float64, device=device)
    ce, _ = inc.seg_head_loss(masks, labels, 4, new_class_weight=0.3, image_weight=image_weight)
    logits = F.interpolate(masks, (9, 10), mode="bilinear", align_corners=False)
    weight = torch.tensor([1, 1, 1, 1, 0.3, 0.3], dtype=torch.float64, device=device)
    pixel_loss = F.cross_entropy(logits, labels, weight=weight, ignore_index=IGNORE, reduction="none")
    assert_close_rel(ce, (pixel_loss * image_weight[:, None, None]).mean(), torch.float64, "ce")

    only_new = torch.where(labels >= 4, labels, IGNORE)
    half, _ = inc.seg_head_loss(masks, only_new, 4, new_class_weight=0.5)
    full, _ = inc.seg_head_loss(masks, only_new, 4, new_class_weight=1.0)
    assert_close_rel(half, 0.5 * full, torch.float64, "ce of new-class pixels only")


@pytest.mark.parametrize("device", DEVICES)
def test_dice_masks_come_from_dice_labels(device):
    """The dice's M_new / M_old come from dice_labels (the ground truth), the CE from labels (pseudo-labels):
    pixels ignored in labels but background in dice_labels are in M_old."""
    generator = torch.Generator().manual_seed(6)
    masks = make_masks((2, 5, 3, 3), torch.float64, device, "contiguous", 2.0, generator)
    truth = make_labels((2, 7, 8), 5, "background_heavy", torch.int64, device, generator)
    truth = torch.where(truth.remainder(5) < 3, 0, truth)  # ground truth of a step: background or new
    pseudo = torch.where(truth == 0, IGNORE, truth)  # every background pixel uncertain
    ce, dice = inc.seg_head_loss(masks, pseudo, 3, dice_labels=truth)
    logits = F.interpolate(masks, (7, 8), mode="bilinear", align_corners=False)
    assert_close_rel(dice, reference.cds_dice_loss(logits, truth, 3), torch.float64, "dice on dice_labels")
    ce_alone, dice_on_pseudo = inc.seg_head_loss(masks, pseudo, 3)
    assert_close_rel(ce, ce_alone, torch.float64, "ce does not depend on dice_labels")
    assert abs(float(dice) - float(dice_on_pseudo)) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("labels_dtype", [torch.int64, torch.uint8])
def test_out_of_range_labels_are_ignored(device, labels_dtype):
    """Labels outside [0, K) that are not ignore_index: the same loss and gradient as ignore_index there."""
    generator = torch.Generator().manual_seed(8)
    masks = make_masks((2, 5, 3, 4), torch.float64, device, "contiguous", 2.0, generator)
    labels = make_labels((2, 8, 9), 5, "out_of_range", labels_dtype, device, generator)
    wide = labels.long()
    cleaned = torch.where((wide >= 0) & (wide < 5), wide, IGNORE).to(labels_dtype)
    assert not torch.equal(labels, cleaned)
    for path in (inc, reference):
        ce, dice = path.seg_head_loss(masks, labels, 3, dice_labels=labels)
        ref_ce, ref_dice = path.seg_head_loss(masks, cleaned, 3)
        assert torch.equal(ce, ref_ce) and torch.equal(dice, ref_dice), path.__name__
    ce, dice, grad = fused_loss_and_grad(masks, labels, 3, (1.0, 1.0))
    ref_ce, ref_dice, ref_grad = reference_loss_and_grad(masks, cleaned, 3, (1.0, 1.0))
    assert_close_rel(ce, ref_ce, torch.float64, "ce")
    assert_close_rel(dice, ref_dice, torch.float64, "dice")
    assert_close_rel(grad, ref_grad, torch.float64, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_zero_losses_and_empty_results(device):
    for path in (inc, reference):
        masks = torch.randn(0, 4, 3, 3, dtype=torch.float32, device=device, requires_grad=True)
        labels = torch.zeros(0, 6, 6, dtype=torch.long, device=device)
        ce, dice = path.seg_head_loss(masks, labels, 2, dice_labels=labels)
        (ce + dice).backward()
        assert ce.item() == 0.0 and dice.item() == 0.0 and masks.grad.shape == masks.shape
        teacher = masks.detach()
        histogram = path.entropy_histogram(teacher, labels, num_bins=10, num_classes=5)
        assert histogram.shape == (4, 10) and histogram.sum() == 0
        pseudo, factor = path.pseudo_label(teacher, labels, torch.full((4,), 0.5, device=device), num_classes=5)
        assert pseudo.shape == (0, 6, 6) and factor.shape == (0,)


@pytest.mark.parametrize("smooth", [1.0, 0.0])
@pytest.mark.parametrize("device", DEVICES)
def test_seg_head_loss_all_ignored_is_zero_not_nan(device, smooth):
    masks = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.full((2, 5, 5), IGNORE, device=device)
    ce, dice = inc.seg_head_loss(masks, labels, 2, smooth=smooth)
    (ce + dice).backward()
    assert ce.item() == 0.0 and dice.item() == 0.0
    assert torch.count_nonzero(masks.grad) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_smooth_zero_with_one_image_all_ignored_matches_the_reference(device):
    """With smooth = 0 an image without valid pixels has dice 0 and no gradient (not 0/0); the other image
    is scored as usual, on both paths."""
    gen = torch.Generator().manual_seed(12)
    masks = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 7, 7), generator=gen)
    labels[1] = IGNORE
    x = masks.float().to(device).requires_grad_()
    ce, dice = inc.seg_head_loss(x, labels.to(device), 2, smooth=0.0)
    (grad,) = torch.autograd.grad(ce + dice, x)
    x64 = masks.clone().requires_grad_()
    expected = inc.reference.seg_head_loss(x64, labels, 2, smooth=0.0)
    (expected_grad,) = torch.autograd.grad(sum(expected), x64)
    assert all(torch.isfinite(value) for value in expected)
    for got, want, name in zip((ce, dice, grad), (*expected, expected_grad), ("ce", "dice", "grad")):
        assert_close_rel(got, want, torch.float32, name)
    assert not grad[1].any()


@pytest.mark.parametrize("device", DEVICES)
def test_seg_head_loss_is_deterministic(device):
    generator = torch.Generator().manual_seed(11)
    masks = make_masks((2, 19, 3, 4), torch.float32, device, "channels_last", 3.0, generator)
    labels = make_labels((2, 17, 23), 19, "random", torch.int64, device, generator)
    first = fused_loss_and_grad(masks, labels, 10, (1.0, 1.0), new_class_weight=2.0)
    second = fused_loss_and_grad(masks, labels, 10, (1.0, 1.0), new_class_weight=2.0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_seg_head_loss_gradcheck():
    generator = torch.Generator().manual_seed(7)
    # 12 mask values: the numerical Jacobian takes 24 forward passes (slow under the interpreter).
    masks = make_masks((2, 3, 2, 1), torch.float64, "cpu", "transposed", 1.5, generator).requires_grad_(True)
    labels = make_labels((2, 5, 4), 3, "random", torch.int64, "cpu", generator)
    image_weight = torch.tensor([0.5, 2.0], dtype=torch.float64)

    def loss(m):
        return inc.seg_head_loss(m, labels, 1, new_class_weight=1.7, smooth=0.5, image_weight=image_weight)

    assert torch.autograd.gradcheck(loss, (masks,))


def test_seg_head_ops_opcheck(kernel_device):
    device = kernel_device
    generator = torch.Generator().manual_seed(9)
    # 2 × 2 cells: opcheck runs each op many times, and the kernels walk the masks cell by cell.
    masks = make_masks((2, 5, 2, 2), torch.float32, device, "transposed", 2.0, generator).requires_grad_(True)
    labels = make_labels((2, 7, 6), 5, "background_heavy", torch.int64, device, generator)
    dice_labels = make_labels((2, 7, 6), 5, "random", torch.int32, device, generator)
    torch.library.opcheck(torch.ops.incrementer_fast.seg_head_loss_sums.default, (masks, labels, dice_labels, 3, IGNORE))
    sums, pixel_stats = torch.ops.incrementer_fast.seg_head_loss_sums(masks.detach(), labels, dice_labels, 3, IGNORE)
    grad_sums = torch.randn(2, 8).to(device).expand(2, 8)
    torch.library.opcheck(
        torch.ops.incrementer_fast.seg_head_loss_sums_backward.default,
        (grad_sums, masks.detach(), labels, dice_labels, pixel_stats, 3, IGNORE),
    )
    teacher = masks.detach()
    torch.library.opcheck(torch.ops.incrementer_fast.plop_entropy_histogram.default, (teacher, labels, 10, 6, "plop"))
    thresholds = torch.full((5,), 0.5, device=device)
    torch.library.opcheck(
        torch.ops.incrementer_fast.plop_pseudo_label.default, (teacher, labels, thresholds, IGNORE, 6, "normalized")
    )


@st.composite
def teacher_cases(draw):
    num_classes = draw(st.sampled_from([2, 3, 6, 17, 40]))
    return dict(
        batch=draw(st.integers(1, 3)),
        num_classes=num_classes,
        h=draw(st.integers(1, 8)), w=draw(st.integers(1, 8)),
        height=draw(st.integers(1, 24)), width=draw(st.integers(1, 24)),
        layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from([0.0, 1.0, 6.0])),
        labels_transposed=draw(st.booleans()),
        num_bins=draw(st.sampled_from([1, 7, 100])),
        entropy=draw(st.sampled_from(["plop", "normalized"])),
        extra_classes=draw(st.integers(0, 60)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("device", DEVICES)
@FEWER_EXAMPLES_INTERPRETED
@given(case=teacher_cases())
def test_teacher_statistics_match_reference(device, case):
    """Histogram and pseudo-labels of the fused path equal the reference's exactly (float64 teacher)."""
    generator = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["num_classes"], case["h"], case["w"])
    teacher = make_masks(shape, torch.float64, device, case["layout"], case["scale"], generator)
    labels = make_labels(
        (case["batch"], case["height"], case["width"]), case["num_classes"] + 3, "background_heavy",
        torch.int64, device, generator, case["labels_transposed"],
    )
    options = dict(num_classes=case["num_classes"] + case["extra_classes"], entropy=case["entropy"])
    histogram = inc.entropy_histogram(teacher, labels, num_bins=case["num_bins"], **options)
    expected_histogram = reference.entropy_histogram(teacher, labels, num_bins=case["num_bins"], **options)
    assert histogram.dtype == torch.int64
    assert torch.equal(histogram, expected_histogram)
    assert histogram.sum() == (labels == 0).sum()

    # Thresholds spread over the entropy's range: [0, 1] normalised, [0, 1 / (K_old·ln K_total)] PLOP's.
    top = 1.0 if case["entropy"] == "normalized" else 1.2 / (case["num_classes"] * math.log(options["num_classes"]))
    thresholds = ((torch.rand(case["num_classes"], generator=generator) * 0.8 + 0.1) * top).to(device)
    pseudo, factor = inc.pseudo_label(teacher, labels, thresholds, min_image_factor=0.05, **options)
    expected_pseudo, expected_factor = reference.pseudo_label(
        teacher, labels, thresholds, min_image_factor=0.05, **options
    )
    assert pseudo.dtype == torch.int64 and factor.dtype == torch.float64
    assert torch.equal(pseudo, expected_pseudo)
    assert torch.equal(factor, expected_factor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, entropy", [(torch.float32, "plop"), (torch.bfloat16, "normalized")])
def test_pseudo_label_low_precision_differs_only_at_the_threshold(device, dtype, entropy):
    """In fp32 arithmetic a pixel may flip only where its entropy is within rounding of its threshold."""
    generator = torch.Generator().manual_seed(13)
    teacher = make_masks((2, 151, 3, 4), dtype, device, "contiguous", 3.0, generator)
    labels = make_labels((2, 11, 13), 160, "background_heavy", torch.int64, device, generator)
    scale = 1.0 if entropy == "normalized" else 1 / (151 * math.log(160))
    thresholds = ((torch.rand(151, generator=generator) * 0.5 + 0.3) * scale).to(device)
    options = dict(num_classes=160, entropy=entropy)
    pseudo, factor = inc.pseudo_label(teacher, labels, thresholds, **options)
    expected, expected_factor = reference.pseudo_label(teacher.double(), labels, thresholds, **options)
    prediction, values = teacher_prediction(teacher.double(), (11, 13), **options)
    near_threshold = (values - thresholds.double()[prediction]).abs() < 1e-5 * scale
    assert torch.equal(pseudo[~near_threshold], expected[~near_threshold])
    background = labels == 0
    allowed = (near_threshold & background).sum((1, 2)) / background.sum((1, 2)) + 1e-6
    assert ((factor.double() - expected_factor).abs() <= allowed).all()


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda m, l: inc.seg_head_loss(m[0], l, 2), ValueError, ["masks", "(B, K, h, w)"]),
        (lambda m, l: inc.seg_head_loss(m, l.float(), 2), TypeError, ["labels"]),
        (lambda m, l: inc.seg_head_loss(m.long(), l, 2), TypeError, ["masks"]),
        (lambda m, l: inc.seg_head_loss(m, l[:1], 2), ValueError, ["masks", "labels", "batch"]),
        (lambda m, l: inc.seg_head_loss(m, l, 4), ValueError, ["num_old", "K = 4"]),
        (lambda m, l: inc.seg_head_loss(m, l, 0), ValueError, ["num_old"]),
        (lambda m, l: inc.seg_head_loss(m, l, 2, new_class_weight=-1.0), ValueError, ["new_class_weight"]),
        (lambda m, l: inc.seg_head_loss(m, l, 2, smooth=-1.0), ValueError, ["smooth"]),
        (lambda m, l: inc.seg_head_loss(m, l, 2, smooth=float("nan")), ValueError, ["smooth", "finite"]),
        (lambda m, l: inc.seg_head_loss(m, l, 2, new_class_weight=float("inf")), ValueError,
         ["new_class_weight", "finite"]),
        # No pixels to upsample the masks to: the same error on both paths (the reference's interpolate would
        # raise its own, the kernels would return zeros).
        (lambda m, l: inc.seg_head_loss(m, l[:, :0, :0], 2), ValueError, ["labels", "(2, 0, 0)", "H, W >= 1"]),
        (lambda m, l: inc.entropy_histogram(m, l[:, :, :0], num_classes=5), ValueError, ["labels", "H, W >= 1"]),
        (lambda m, l: inc.seg_head_loss(m, l, 2, image_weight=torch.ones(3)), ValueError, ["image_weight", "(2,)"]),
        (lambda m, l: inc.seg_head_loss(m, l, 2, dice_labels=l[:, 1:]), ValueError, ["dice_labels", "(2, 6, 6)"]),
        (lambda m, l: inc.seg_head_loss(m, l, 2, dice_labels=l.float()), TypeError, ["dice_labels"]),
        (lambda m, l: inc.entropy_histogram(m, l, num_bins=0, num_classes=5), ValueError, ["num_bins"]),
        (lambda m, l: inc.entropy_histogram(m[:, :1], l, num_classes=5), ValueError, ["teacher_masks", "K_old"]),
        (lambda m, l: inc.entropy_histogram(m, l), ValueError, ["num_classes", "K_old = 4", "entropy='plop'"]),
        (lambda m, l: inc.entropy_histogram(m, l, num_classes=3), ValueError, ["num_classes", "K_old = 4"]),
        (lambda m, l: inc.entropy_histogram(m, l, entropy="shannon"), ValueError, ["entropy", "'plop'"]),
        (lambda m, l: inc.pseudo_label(m, l, torch.ones(3), num_classes=5), ValueError, ["thresholds", "(4,)"]),
        (lambda m, l: inc.pseudo_label(m, l, torch.ones(4, dtype=torch.long)), TypeError, ["thresholds"]),
        (lambda m, l: inc.pseudo_label(m, l, torch.ones(4)), ValueError, ["num_classes", "K_total"]),
        (lambda m, l: inc.plop_thresholds(torch.ones(4, 3)), TypeError, ["histogram"]),
        (lambda m, l: inc.plop_thresholds(torch.ones(4, dtype=torch.long)), ValueError, ["histogram"]),
        (lambda m, l: inc.plop_thresholds(torch.ones(4, 3, dtype=torch.long), median="mean"), ValueError, ["median"]),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, error, words):
    masks = torch.randn(2, 4, 3, 3)
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    with pytest.raises(error) as info:
        call(masks, labels)
    for word in words:
        assert word in str(info.value)


def test_kernels_give_the_same_results_in_bands_of_two_cells(kernel_device, monkeypatch):
    """A program owns a band of cells (and the backward walks a ring around it): bands of 2 × 2 cells, which
    cut 7 × 5 masks (down- and up-sampled rows) into many bands with partial edges, give the per-pixel
    statistics, the gradient, the histogram and the pseudo-labels of the default bands bit for bit, and the
    same sums up to their summation order."""
    from incrementer_fast.kernels import seg_head as kernels

    device = kernel_device
    generator = torch.Generator().manual_seed(23)
    # 7 × 5 cells: rows up-sampled 7 → 19 in one image shape, down-sampled 7 → 4 in the other.
    for height, width in ((19, 13), (4, 13)):
        masks = make_masks((1, 9, 7, 5), torch.float32, device, "strided", 3.0, generator)
        labels = make_labels((1, height, width), 9, "background_heavy", torch.int64, device, generator)
        dice_labels = make_labels((1, height, width), 9, "random", torch.int32, device, generator)
        sums, stats = kernels.seg_head_loss_forward(masks, labels, dice_labels, 4, IGNORE)
        band_sums, band_stats = kernels.seg_head_loss_forward(masks, labels, dice_labels, 4, IGNORE, band=2)
        assert torch.equal(stats, band_stats)
        assert_close_rel(band_sums, sums, torch.float32, "sums")
        grad_sums = torch.randn(1, 8, generator=generator).to(device)
        grad = kernels.seg_head_loss_backward(grad_sums, masks, labels, dice_labels, stats, 4, IGNORE)
        band_grad = kernels.seg_head_loss_backward(grad_sums, masks, labels, dice_labels, stats, 4, IGNORE, band=2)
        assert torch.equal(grad, band_grad)
        histogram = kernels.entropy_histogram_forward(masks, labels, 10, 12, "plop")
        assert torch.equal(histogram, kernels.entropy_histogram_forward(masks, labels, 10, 12, "plop", band=2))
        with monkeypatch.context() as patch:  # 12 programs sharing 5 copies of the histogram
            patch.setattr(kernels, "HISTOGRAM_COPIES", 5)
            assert torch.equal(histogram, kernels.entropy_histogram_forward(masks, labels, 10, 12, "plop", band=2))
        thresholds = torch.full((9,), 0.5, device=device)
        pseudo, counts = kernels.pseudo_label_forward(masks, labels, thresholds, IGNORE, 12, "normalized")
        band_pseudo, band_counts = kernels.pseudo_label_forward(masks, labels, thresholds, IGNORE, 12, "normalized", band=2)
        assert torch.equal(pseudo, band_pseudo) and torch.equal(counts, band_counts)
        assert counts[:, 1].sum() > 0  # some pixels took a pseudo-label


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seg_head_loss_bf16_cuda_matches_reference():
    generator = torch.Generator().manual_seed(17)
    masks = make_masks((4, 151, 16, 16), torch.bfloat16, "cuda", "contiguous", 3.0, generator)
    labels = make_labels((4, 128, 96), 151, "random", torch.int64, "cuda", generator)
    ce, dice, grad = fused_loss_and_grad(masks, labels, 101, (1.0, 1.0), new_class_weight=2.0)
    ref_ce, ref_dice, ref_grad = reference_loss_and_grad(masks, labels, 101, (1.0, 1.0), new_class_weight=2.0)
    assert_close_rel(ce, ref_ce, torch.float32, "ce")
    assert_close_rel(dice, ref_dice, torch.float32, "dice")
    assert_close_rel(grad, ref_grad, torch.bfloat16, "grad of masks")
