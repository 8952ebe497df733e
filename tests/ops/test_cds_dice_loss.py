"""Parity tests of cds_dice_loss (custom op + Triton kernels) against the float64 reference.

Run on the CPU without TRITON_INTERPRET (the op dispatches to the reference: its properties are checked)
and with TRITON_INTERPRET=1 (the Triton kernels run through the interpreter, with the interpreter's and a
GPU's launch plans); on a CUDA machine every test also runs on the GPU.
"""
import math

import pytest
import torch
from helpers import REL_ERR_BOUND, assert_close_rel, rel_err
from hypothesis import given
from hypothesis import strategies as st

import incrementer_fast as inc
from incrementer_fast import reference
from incrementer_fast._dispatch import backend
from conftest import DEVICES, KERNEL_DEVICES
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]


def make_logits(shape, dtype, device, layout, values, generator):
    """Logits of logical shape (B, C, *spatial) in the given memory layout and value regime.

    values: "normal" (3·N(0, 1)); "offset" (normal plus ±1e4 per pixel: softmax-invariant, so only the
    max-subtraction keeps it finite); "large" (1e4·N(0, 1): saturated, one-hot softmaxes); "zeros".
    """
    batch, num_classes, *spatial = shape
    data = torch.randn(shape, generator=generator, dtype=torch.float64)
    if values == "normal":
        data = 3.0 * data
    elif values == "offset":
        sign = torch.randint(0, 2, (batch, 1, *spatial), generator=generator) * 2 - 1
        data = 3.0 * data + 1e4 * sign
    elif values == "large":
        data = (1e4 * data).clamp(-6e4, 6e4)  # finite in float16
    else:
        data = torch.zeros_like(data)
    if layout == "channels_last":  # C innermost, like a (B, H, W, C) head output moved to (B, C, H, W)
        physical, to_logical = (batch, *spatial, num_classes), lambda t: t.movedim(-1, 1)
    elif layout == "transposed" and len(spatial) == 2:  # the two spatial dims swapped in memory
        physical, to_logical = (batch, num_classes, spatial[1], spatial[0]), lambda t: t.transpose(2, 3)
    elif layout == "transposed":  # 1-D spatial: batch and class dims swapped in memory instead
        physical, to_logical = (num_classes, batch, *spatial), lambda t: t.transpose(0, 1)
    elif layout == "strided":  # every other class of a twice-larger tensor: not dense
        physical, to_logical = (batch, 2 * num_classes, *spatial), lambda t: t[:, ::2]
    else:
        physical, to_logical = shape, lambda t: t
    logits = to_logical(torch.zeros(physical, dtype=dtype, device=device))
    logits.copy_(data)
    return logits


def make_labels(shape, num_classes, num_old, ignore_index, kind, dtype, device, generator, transposed=False):
    """Integer labels (B, *spatial): random classes (values ≥ C included), ~20 % ignored, and edge cases."""
    labels = torch.randint(0, num_classes + 3, shape, generator=generator)
    ignored = torch.rand(shape, generator=generator) < 0.2
    labels[ignored] = ignore_index
    if kind == "all_ignore_image":
        labels[0] = ignore_index
    elif kind == "no_new_image":
        labels[0] = torch.where(labels[0] >= num_old, labels[0] % num_old, labels[0])
        labels[0][ignored[0]] = ignore_index
    elif kind == "all_ignore":
        labels[:] = ignore_index
    labels = labels.to(dtype)
    if transposed and labels.dim() == 3:
        labels = labels.transpose(1, 2).contiguous().transpose(1, 2)
    return labels.to(device)


def reference_loss_and_grad(logits, labels, num_old, ignore_index, smooth, upstream):
    x = logits.detach().double().requires_grad_()
    loss = reference.cds_dice_loss(x, labels, num_old, ignore_index, smooth)
    (grad,) = torch.autograd.grad(loss, x, upstream.double())
    return loss.detach(), grad


def op_loss_and_grad(logits, labels, num_old, ignore_index, smooth, upstream):
    x = logits.detach().requires_grad_()
    loss = inc.cds_dice_loss(x, labels, num_old, ignore_index, smooth)
    (grad,) = torch.autograd.grad(loss, x, upstream)
    return loss.detach(), grad


def assert_loss_close(actual, expected, dtype):
    # Each dice term is 1 − N/D: its rounding error is relative to 1, not to the (possibly tiny) loss.
    err = (actual.double() - expected.double()).abs().item() / max(1.0, expected.abs().item())
    assert err <= REL_ERR_BOUND[dtype], f"loss: error {err:.3e} > {REL_ERR_BOUND[dtype]:.1e} ({dtype})"


def reference_vjp_error(logits, labels, num_old, ignore_index, smooth, upstream):
    """Absolute error of the float64 reference gradient itself.

    Autograd of the reference ends in the softmax VJP P_c·(d_c − Σ_j P_j·d_j), with d = ∂loss/∂P_new or
    ∂loss/∂P_old = g/B·(N/D² − 2·M/D). When one group of classes holds all but ~1e-16 of a pixel's mass the
    subtraction cancels and loses about eps64·|d|·P_c: far below any bound, except when every pixel is
    saturated and the whole gradient is that small. Returns 8·eps64·max|d|·‖P over valid pixels‖.
    """
    x = logits.detach().double().cpu()
    batch, num_classes = x.shape[:2]
    probs = torch.softmax(x, dim=1).reshape(batch, num_classes, -1)
    flat = labels.cpu().reshape(batch, -1)
    valid = flat != ignore_index
    groups = [
        (probs[:, num_old:].sum(1), valid & (flat >= num_old)),
        (probs[:, :num_old].sum(1), valid & (flat < num_old)),
    ]
    d_max = 0.0
    for p, mask in groups:
        den = (p * valid).sum(1) + mask.sum(1) + smooth
        num = 2.0 * (p * mask).sum(1) + smooth
        d_bound = torch.where(valid.any(1), 2.0 / den + num / den**2, 0.0)
        d_max = max(d_max, d_bound.max().item())
    scale = abs(upstream.double().item()) / batch * d_max
    return 8 * torch.finfo(torch.float64).eps * scale * torch.linalg.vector_norm(probs * valid[:, None]).item()


def assert_grad_close(actual, expected, dtype, reference_error=0.0):
    # Relative-norm error, plus the reference's own absolute error (see reference_vjp_error), plus one
    # quantum per element at the bottom of the range: gradients of saturated softmaxes underflow in float32
    # (below float32's tiny, flushed on GPUs) or land among the float16 subnormals, where rounding is absolute.
    compute_tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    smallest_subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    floor = max(smallest_subnormal, compute_tiny)
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert torch.isfinite(actual.double()).all(), "grad: non-finite values"
    diff = torch.linalg.vector_norm(actual.double().cpu() - expected.double().cpu()).item()
    ref = torch.linalg.vector_norm(expected.double().cpu()).item()
    allowed = REL_ERR_BOUND[dtype] * ref + reference_error + floor * math.sqrt(expected.numel())
    relative = rel_err(actual, expected)
    assert diff <= allowed, f"grad: error {diff:.3e} > {allowed:.3e} (relative {relative:.3e}, {dtype})"


@st.composite
def cases(draw):
    num_classes = draw(st.one_of(st.integers(2, 23), st.sampled_from([31, 64, 97, 131, 151, 160])))
    spatial = draw(st.one_of(st.tuples(st.integers(1, 41)), st.tuples(st.integers(1, 9), st.integers(1, 13))))
    ignore_index = draw(st.sampled_from([255, -1, 7]))
    return dict(
        batch=draw(st.integers(1, 3)),
        num_classes=num_classes,
        num_old=draw(st.integers(1, num_classes - 1)),
        spatial=spatial,
        ignore_index=ignore_index,
        label_kind=draw(st.sampled_from(["random", "all_ignore_image", "no_new_image", "all_ignore"])),
        label_dtype=draw(st.sampled_from([torch.int64, torch.int32] + ([torch.uint8] if ignore_index >= 0 else []))),
        values=draw(st.sampled_from(["normal", "normal", "offset", "large", "zeros"])),
        layout=draw(st.sampled_from(LAYOUTS)),
        dtype=draw(st.sampled_from(FLOATS)),
        smooth=draw(st.sampled_from([1.0, 0.1, 1e-3])),
        upstream=draw(st.sampled_from(["one", "random", "view"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def upstream_grad(kind, dtype, device, generator):
    """The 0-dim upstream gradient: one, a random value, or a 0-dim view into an expanded (stride-0) tensor."""
    if kind == "one":
        return torch.ones((), dtype=dtype, device=device)
    value = torch.randn(4, generator=generator, dtype=torch.float64).to(dtype).to(device)
    if kind == "random":
        return value[0].clone()
    return value.expand(3, 4)[1, 2]


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases())
def test_matches_reference(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["num_classes"], *case["spatial"])
    logits = make_logits(shape, case["dtype"], device, case["layout"], case["values"], gen)
    labels = make_labels(
        (case["batch"], *case["spatial"]), case["num_classes"], case["num_old"], case["ignore_index"],
        case["label_kind"], case["label_dtype"], device, gen, transposed=case["layout"] == "transposed",
    )  # fmt: skip
    loss_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    upstream = upstream_grad(case["upstream"], loss_dtype, device, gen)
    args = (logits, labels, case["num_old"], case["ignore_index"], case["smooth"])

    loss, grad = op_loss_and_grad(*args, upstream)
    ref_loss, ref_grad = reference_loss_and_grad(*args, upstream)

    assert loss.shape == () and loss.dtype == loss_dtype
    assert_loss_close(loss, ref_loss, case["dtype"])
    assert_grad_close(grad, ref_grad, case["dtype"], reference_vjp_error(*args, upstream))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_classes, num_old", [(21, 16), (151, 100)])  # one register tile / chunked C
def test_layouts_and_channel_paths(device, layout, num_classes, num_old):
    gen = torch.Generator().manual_seed(num_classes)
    logits = make_logits((2, num_classes, 9, 11), torch.float32, device, layout, "normal", gen)
    transposed = layout == "transposed"
    labels = make_labels((2, 9, 11), num_classes, num_old, 255, "random", torch.int64, device, gen, transposed)
    upstream = upstream_grad("random", torch.float32, device, gen)
    loss, grad = op_loss_and_grad(logits, labels, num_old, 255, 1.0, upstream)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, num_old, 255, 1.0, upstream)
    assert_close_rel(loss, ref_loss, torch.float32, "loss")
    assert_close_rel(grad, ref_grad, torch.float32, "grad")
    if backend(device) == "triton":
        assert grad.stride() == torch.empty_like(logits).stride()  # the kernels' gradient keeps logits' layout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values", ["large", "zeros"])
def test_extreme_logits_float32(device, values):
    # ±1e4-scale logits: one-hot softmaxes, and in the chunked path (C = 131) running maxima that jump by
    # thousands between chunks; zeros: uniform softmaxes.
    gen = torch.Generator().manual_seed(17)
    logits = make_logits((2, 131, 6, 5), torch.float32, device, "contiguous", values, gen)
    labels = make_labels((2, 6, 5), 131, 70, 255, "random", torch.int64, device, gen)
    upstream = upstream_grad("random", torch.float32, device, gen)
    loss, grad = op_loss_and_grad(logits, labels, 70, 255, 1.0, upstream)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, 70, 255, 1.0, upstream)
    assert_loss_close(loss, ref_loss, torch.float32)
    reference_error = reference_vjp_error(logits, labels, 70, 255, 1.0, upstream)
    assert_grad_close(grad, ref_grad, torch.float32, reference_error)


@pytest.mark.parametrize("device", DEVICES)
def test_three_spatial_dims_unmergeable_layout(device):
    # (B, C, D, H, W) whose spatial dims are permuted in memory: the kernels take the documented copy path.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 4, 3, 6, generator=gen).permute(0, 1, 3, 4, 2).to(device)
    labels = make_labels((2, 3, 6, 4), 5, 2, 255, "random", torch.int64, device, gen)
    upstream = torch.ones((), device=device)
    loss, grad = op_loss_and_grad(logits, labels, 2, 255, 1.0, upstream)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, 2, 255, 1.0, upstream)
    assert_close_rel(loss, ref_loss, torch.float32, "loss")
    assert_close_rel(grad, ref_grad, torch.float32, "grad")
    if backend(device) == "triton":
        assert grad.stride() == torch.empty_like(logits).stride()


def test_kernels_with_small_blocks(kernel_device):
    """Chunked channels, several tiles per program and several programs per image, on a small input."""
    device = kernel_device
    from incrementer_fast.kernels.cds_dice_loss import cds_dice_loss_backward, cds_dice_loss_forward

    dtype = torch.float64  # the tightest bound: any indexing or accumulation slip shows
    gen = torch.Generator().manual_seed(7)
    logits = make_logits((2, 21, 5, 7), dtype, device, "channels_last", "normal", gen)
    labels = make_labels((2, 5, 7), 21, 9, -1, "no_new_image", torch.int64, device, gen)
    upstream = torch.tensor(-1.5, dtype=dtype, device=device)
    blocks = dict(block_c=8, block_s=16)  # 3 channel chunks; 35 pixels = 3 tiles, 2 per program
    loss, stats = cds_dice_loss_forward(logits, labels, 9, -1, 0.1, chunks_per_image=2, **blocks)
    grad = cds_dice_loss_backward(upstream, logits, labels, stats, 9, -1, 0.1, **blocks)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, 9, -1, 0.1, upstream)
    assert_close_rel(loss, ref_loss, dtype, "loss")
    assert_close_rel(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.uint8])
def test_labels_outside_the_classes_are_ignored(device, label_dtype):
    """Labels ≥ C or < 0 (other than ignore_index) belong to no class the logits score. They are
    ignored on both paths: the loss and gradient equal those with ignore_index in their place."""
    gen = torch.Generator().manual_seed(19)
    logits = make_logits((3, 7, 6, 5), torch.float32, device, "contiguous", "normal", gen)
    labels = torch.randint(0, 7, (3, 6, 5), generator=gen)
    labels[0, 0, :4] = torch.tensor([7, 9, 200, 255])
    labels[1, 2] = 12  # a whole row of one out-of-range value
    if label_dtype == torch.int64:
        labels[2, 1, :3] = torch.tensor([-1, -7, -300])
    labels = labels.to(device, label_dtype)
    cleaned = labels.clone()
    cleaned[(labels < 0) | (labels >= 7)] = 255
    upstream = torch.tensor(0.8, device=device)
    loss, grad = op_loss_and_grad(logits, labels, 4, 255, 1.0, upstream)
    clean_loss, clean_grad = op_loss_and_grad(logits, cleaned, 4, 255, 1.0, upstream)
    assert torch.equal(loss, clean_loss) and torch.equal(grad, clean_grad)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, 4, 255, 1.0, upstream)
    assert_close_rel(loss, ref_loss, torch.float32, "loss")
    assert_close_rel(grad, ref_grad, torch.float32, "grad")
    with pytest.raises(ValueError, match="outside"):
        inc.check_labels(labels, 7, 255)


@pytest.mark.parametrize("device", DEVICES)
def test_smooth_zero_on_an_image_without_valid_pixels(device):
    """Image 0 is all ignored: with smooth = 0 its dice is 0 (the value every smooth > 0 gives it), not 0/0,
    and it gives no gradient; image 1 is scored as usual. Both paths, against the float64 reference."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 4, 4), generator=gen)
    labels[0] = 255
    x = logits.float().to(device).requires_grad_()
    loss = inc.cds_dice_loss(x, labels.to(device), num_old=2, smooth=0.0)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = logits.clone().requires_grad_()
    expected = inc.reference.cds_dice_loss(x64, labels, 2, smooth=0.0)
    (expected_grad,) = torch.autograd.grad(expected, x64)
    alone = inc.reference.cds_dice_loss(logits[1:], labels[1:], 2, smooth=0.0)
    assert torch.isfinite(expected) and abs(expected.item() - alone.item() / 2) < 1e-12
    assert_close_rel(loss, expected, torch.float32, "loss")
    assert_close_rel(grad, expected_grad, torch.float32, "grad")
    assert not grad[0].any()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_zero(device):
    logits = torch.randn(0, 5, 4, 4, device=device, requires_grad=True)
    labels = torch.zeros(0, 4, 4, dtype=torch.int64, device=device)
    loss = inc.cds_dice_loss(logits, labels, num_old=2)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and grad.shape == logits.shape
    assert inc.reference.cds_dice_loss(logits, labels, 2).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    gen = torch.Generator().manual_seed(11)
    logits = make_logits((2, 151, 9, 13), torch.float32, device, "contiguous", "normal", gen)
    labels = make_labels((2, 9, 13), 151, 60, 255, "random", torch.int64, device, gen)
    upstream = torch.ones((), device=device)
    first = op_loss_and_grad(logits, labels, 60, 255, 1.0, upstream)
    second = op_loss_and_grad(logits, labels, 60, 255, 1.0, upstream)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(5)
    logits = make_logits((2, 7, 5, 3), torch.float32, device, "channels_last", "normal", gen)
    labels = make_labels((2, 5, 3), 7, 3, 255, "random", torch.int64, device, gen)
    torch.library.opcheck(torch.ops.incrementer_fast.cds_dice_loss.default, (logits, labels, 3, 255, 1.0))
    _, stats = torch.ops.incrementer_fast.cds_dice_loss(logits, labels, 3, 255, 1.0)
    upstream = torch.tensor(0.5, device=device)
    torch.library.opcheck(
        torch.ops.incrementer_fast.cds_dice_loss_backward.default,
        (upstream, logits, labels, stats, 3, 255, 1.0),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    logits = torch.randn(2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([[1, 255], [0, 3]], device=device)  # new, ignored | old, a value ≥ C (ignored)
    assert torch.autograd.gradcheck(lambda x: inc.cds_dice_loss(x, labels, 1, smooth=0.1), (logits,))


@pytest.mark.plan_independent
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    gen = torch.Generator().manual_seed(13)
    logits = make_logits((2, 6, 5, 7), torch.float32, device, "contiguous", "normal", gen)
    labels = make_labels((2, 5, 7), 6, 2, 7, "random", torch.int64, device, gen)

    def step(x):
        return inc.cds_dice_loss(x, labels, 2, ignore_index=7, smooth=0.5) * 2.5

    compiled = torch.compile(step, fullgraph=True)
    x_eager = logits.clone().requires_grad_()
    x_compiled = logits.clone().requires_grad_()
    loss_eager = step(x_eager)
    loss_eager.backward()
    loss_compiled = compiled(x_compiled)
    loss_compiled.backward()
    # The compiler may fuse and reorder the reference's float32 arithmetic: the per-dtype bounds, not bits.
    assert_close_rel(loss_compiled, loss_eager, torch.float32, "loss")
    assert_close_rel(x_compiled.grad, x_eager.grad, torch.float32, "grad")


def _int(*shape, device="cpu"):
    return torch.zeros(shape, dtype=torch.long, device=device)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(2, 5, 4, 4), _int(2, 4, 5), 2),
         ValueError, r"labels must have shape \(B, \*spatial\) = \(2, 4, 4\).*\(2, 5, 4, 4\).*got \(2, 4, 5\)"),
        (lambda: (torch.randn(2, 5, 4), _int(3, 4), 2), ValueError, r"labels .*\(2, 4\).*got \(3, 4\)"),
        (lambda: (torch.randn(2, 5, 4), torch.zeros(2, 4), 2),
         TypeError, r"labels must be an integer tensor.*\(2, 4\)"),
        (lambda: (torch.randn(2, 5, 4), _int(2, 4), 0), ValueError, r"num_old .*C = 5.*\(2, 5, 4\)"),
        (lambda: (torch.randn(2, 5, 4), _int(2, 4), 5), ValueError, r"num_old .*C = 5.*\(2, 5, 4\)"),
        (lambda: (_int(2, 5, 4), _int(2, 4), 2), TypeError, r"logits must be float.*\(2, 5, 4\)"),
        (lambda: (torch.randn(5), _int(), 2), ValueError, r"logits must have shape .*\(5,\)"),
        (lambda: (torch.randn(2, 5, 4), _int(2, 4, device="meta"), 2),
         ValueError, r"one device.*logits on cpu.*labels on meta"),
    ],
)  # fmt: skip
def test_bad_inputs(make, error, match):
    logits, labels, num_old = make()
    with pytest.raises(error, match=match):
        inc.cds_dice_loss(logits, labels, num_old)


@pytest.mark.parametrize("smooth", [-1.0, float("nan"), float("inf")])
def test_smooth_must_be_finite_and_non_negative(smooth):
    with pytest.raises(ValueError, match="smooth must be a non-negative finite float"):
        inc.cds_dice_loss(torch.randn(2, 5, 4), _int(2, 4), 2, smooth=smooth)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_more_than_2_31_elements():
    # 2 × 130 × 2880² ≈ 2.16e9 > 2^31 bfloat16 logits (4.3 GB, gradient as much): image 1 ends past 2^31.
    # bfloat16, not float16: over 8.3e6 pixels per image the gradient entries (~1e-9) are below float16's
    # smallest subnormal, while bfloat16 has float32's range.
    batch, num_classes, num_old, side = 2, 130, 97, 2880
    assert batch * num_classes * side * side > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, num_classes, side, side, device="cuda", dtype=torch.bfloat16, generator=gen)
    labels = torch.randint(0, num_classes, (batch, side, side), device="cuda", generator=gen)
    labels[:, :100] = 255
    x = logits.requires_grad_()
    loss = inc.cds_dice_loss(x, labels, num_old)
    loss.backward()
    # Reference one image at a time in float32 (float64 would not fit beside the rest): with the batch mean,
    # loss = mean_b loss_b and ∂loss/∂x_b = ∂loss_b/∂x_b / B.
    ref_terms = []
    for b in range(batch):
        xb = logits[b : b + 1].detach().float().requires_grad_()
        ref_b = reference.cds_dice_loss(xb, labels[b : b + 1], num_old)
        (ref_grad_b,) = torch.autograd.grad(ref_b, xb)
        ref_terms.append(ref_b.detach())
        err = (x.grad[b : b + 1].float() - ref_grad_b / batch).norm() / (ref_grad_b / batch).norm()
        assert err.item() <= REL_ERR_BOUND[torch.bfloat16], f"image {b}: grad relative error {err.item():.3e}"
        del xb, ref_grad_b
    assert_loss_close(loss.detach(), torch.stack(ref_terms).mean(), torch.bfloat16)
