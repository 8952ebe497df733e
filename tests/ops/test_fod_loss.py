"""Parity tests of `incrementer_fast.fod_loss` (the custom op and its kernels) against the float64 reference.

Run on the CPU without TRITON_INTERPRET (the op dispatches to the reference: its properties are checked)
and with TRITON_INTERPRET=1 (the Triton kernels through the interpreter, with the interpreter's and a GPU's
launch plans); on CUDA when a GPU is present.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import incrementer_fast as inc
from helpers import REL_ERR_BOUND, assert_close_rel
from incrementer_fast.kernels import fod_loss as fod_kernels
from incrementer_fast.kernels.fod_loss import row_layout

# The `device` fixture only names a device, so reusing it across hypothesis examples is safe.
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [1, 2, 3, 5, 7, 13]  # 1, primes, a non-power of two
DIMS = [1, 2, 3, 8, 31, 64, 97, 127, 200]
# Row norms: zero, far and just below eps (the clamped branch), just above it (units of eps); regular, large.
SMALL_NORMS_IN_EPS = [0.0, 1e-4, 0.5, 4.0]
LARGE_NORMS = [1.0, 300.0]


def _eps_for(dtype):
    # Gradients of rows with ‖x‖ < eps scale as 1/eps: 1e8 overflows fp16 (max 65504), as in the reference.
    return 1e-3 if dtype == torch.float16 else 1e-8


def _make(shape, dtype, device, layout, gen, row_norms=None):
    """A tensor of `shape` (..., D) in the given memory layout; rows rescaled to `row_norms` (...) if given."""
    *lead, dim = shape
    if layout == "contiguous":
        base = torch.empty(shape, dtype=torch.float64)
        view = base
    elif layout == "slice":  # the last leading dim cut from a bigger tensor, like class_emb[:, :K_old]
        axis = len(lead) - 1
        big = list(shape)
        big[axis] += 3
        base = torch.empty(big, dtype=torch.float64)
        view = base.narrow(axis, 1, shape[axis])
    elif layout == "transposed":  # leading dims reversed in memory, e.g. (N, B, D) viewed as (B, N, D)
        base = torch.empty([*lead[::-1], dim], dtype=torch.float64)
        order = list(range(len(lead)))[::-1] + [len(lead)]
        view = base.permute(order)
    elif layout == "features_transposed":  # D is the slow axis: column stride = number of rows
        base = torch.empty([dim, *lead], dtype=torch.float64)
        view = base.permute(list(range(1, len(lead) + 1)) + [0])
    elif layout == "strided_features":  # every other feature of a wider tensor
        base = torch.empty([*lead, 2 * dim], dtype=torch.float64)
        view = base[..., ::2]
    else:
        raise AssertionError(layout)
    base.normal_(generator=gen)
    if row_norms is not None:
        view.mul_((row_norms / torch.linalg.vector_norm(view, dim=-1)).unsqueeze(-1))
    base = base.to(device=device, dtype=dtype)
    return base.as_strided(view.shape, view.stride(), view.storage_offset())


def _reference(student, teacher, weight, eps, teacher_grad, grad_loss):
    """Loss and gradients of the reference evaluated in float64 on the (already rounded) inputs."""
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_(teacher_grad)
    loss = inc.reference.fod_loss(s, t, weight.detach().double(), eps)
    inputs = [s, t] if teacher_grad else [s]
    grads = torch.autograd.grad(loss, inputs, grad_loss.double())
    return loss.detach(), grads


def _assert_close_floor(actual, expected, dtype, floor, what):
    """Relative-norm error ‖a − b‖ / max(‖b‖, floor) within the dtype's bound.

    The loss is a mean of 1 − cos, and each row's gradient a difference of two terms (t̂ and cos·ŝ, scaled),
    which cancel exactly when the vectors are parallel (always for D = 1): the computable accuracy is then
    relative to the size of the terms (`floor`), not to their vanishing difference.
    """
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual.detach().double()).all(), f"{what}: non-finite values"
    a = actual.detach().double().cpu()
    b = expected.detach().double().cpu()
    scale = max(torch.linalg.vector_norm(b).item(), floor)
    err = torch.linalg.vector_norm(a - b).item() / scale
    bound = REL_ERR_BOUND[dtype]
    assert err <= bound, f"{what}: relative-norm error {err:.3e} > {bound:.1e} ({dtype})"


def _gradient_term_norm(x, weight, eps, grad_loss):
    """‖(g·w_i / W) / max(‖x_i‖, eps)‖ over rows i: the size of the terms whose difference is ∂loss/∂x."""
    w = weight.detach().double()
    norms = torch.linalg.vector_norm(x.detach().double(), dim=-1).clamp_min(eps)
    return torch.linalg.vector_norm(grad_loss.double().cpu() * (w / w.sum() / norms).cpu()).item()


def _expected_grad(ref_grad, dtype):
    # fp16/bf16 gradients of a mean over many vectors reach the subnormal range, where the output rounding
    # alone exceeds any fixed relative bound: compare with the float64 gradient rounded to the output dtype,
    # so that the bound measures the computation, not the storage format.
    if dtype in (torch.float16, torch.bfloat16):
        return ref_grad.to(dtype).double()
    return ref_grad


@st.composite
def fod_cases(draw):
    lead = draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3))
    dim = draw(st.sampled_from(DIMS))
    layouts = st.sampled_from(["contiguous", "slice", "transposed", "features_transposed", "strided_features"])
    return {
        "shape": (*lead, dim),
        "dtype": draw(st.sampled_from(DTYPES)),
        "student_layout": draw(layouts),
        "teacher_layout": draw(layouts),
        "weight_layout": draw(st.sampled_from(["contiguous", "transposed"])),
        "weights": draw(st.sampled_from(["random", "mixed_zero", "all_zero", "ones"])),
        "weight_dtype": draw(st.sampled_from([torch.float32, "input"])),
        "magnitudes": draw(st.sampled_from(["unit", "mixed"])),
        "teacher_grad": draw(st.booleans()),
        "upstream": draw(st.sampled_from(["random", "expanded"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@fixture_ok
@given(case=fod_cases())
def test_forward_and_gradients_match_float64_reference(device, case):
    shape, dtype = case["shape"], case["dtype"]
    eps = _eps_for(dtype)
    gen = torch.Generator().manual_seed(case["seed"])
    lead = shape[:-1]

    def row_norms():
        if case["magnitudes"] == "unit":
            return None
        norms = torch.tensor([n * eps for n in SMALL_NORMS_IN_EPS] + LARGE_NORMS, dtype=torch.float64)
        return norms[torch.randint(len(norms), lead, generator=gen)]

    student = _make(shape, dtype, device, case["student_layout"], gen, row_norms()).requires_grad_()
    teacher = _make(shape, dtype, device, case["teacher_layout"], gen, row_norms())
    teacher.requires_grad_(case["teacher_grad"])
    weight = _make((*lead, 1), torch.float32, device, case["weight_layout"], gen)[..., 0].abs()
    if case["weights"] == "mixed_zero":
        weight = weight * (torch.rand(lead, generator=gen) < 0.5).to(device)
    elif case["weights"] == "all_zero":
        weight = weight * 0
    elif case["weights"] == "ones":
        weight = torch.ones_like(weight)
    if case["weight_dtype"] == "input":
        weight = weight.to(dtype)

    loss = inc.fod_loss(student, teacher, weight, eps)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grad_loss = torch.rand((), generator=gen, dtype=loss.dtype).to(device) + 0.5
    inputs = [student, teacher] if case["teacher_grad"] else [student]
    if case["upstream"] == "expanded":
        # d(sum of a broadcast copy)/d loss reaches the op as a reduced, possibly stride-0, scalar
        grads = torch.autograd.grad(loss.expand(3, 2).sum() * grad_loss, inputs)
        grad_loss = grad_loss * 6
    else:
        grads = torch.autograd.grad(loss, inputs, grad_loss)

    ref_loss, ref_grads = _reference(student, teacher, weight, eps, case["teacher_grad"], grad_loss)
    if not weight.any():  # "all_zero", or "mixed_zero" that zeroed every weight: Σ w = 0
        assert loss.item() == 0.0
        for grad in grads:
            assert torch.count_nonzero(grad) == 0
        return
    _assert_close_floor(loss, ref_loss, dtype, 1.0, "loss")
    for name, grad, ref_grad, x in zip(("student", "teacher"), grads, ref_grads, inputs):
        assert grad.dtype == x.dtype, name
        floor = _gradient_term_norm(x, weight, eps, grad_loss)
        _assert_close_floor(grad, _expected_grad(ref_grad, dtype), dtype, floor, f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_weight_sum_gives_exact_zero_and_zero_gradients(device, dtype):
    # Σ max(w, 0) = 0 with all-zero weights, with zero vectors among the rows, and with weights ≤ 0.
    student = torch.randn(5, 7, 33, dtype=dtype, device=device)
    student[0, 0] = 0
    student.requires_grad_()
    teacher = torch.randn(5, 7, 33, dtype=dtype, device=device)
    teacher[1, 2] = 0
    teacher.requires_grad_()
    non_positive = torch.zeros(5, 7, device=device)
    non_positive[0, 1], non_positive[3, 4] = -2.0, -0.5
    for weight in (torch.zeros(5, 7, device=device), non_positive):
        loss = inc.fod_loss(student, teacher, weight)
        grad_student, grad_teacher = torch.autograd.grad(loss, [student, teacher])
        assert loss.item() == 0.0 and not loss.isnan()
        assert torch.count_nonzero(grad_student) == 0 and torch.count_nonzero(grad_teacher) == 0


def test_empty_input_gives_zero(device):
    student = torch.randn(0, 3, 16, device=device, requires_grad=True)
    loss = inc.fod_loss(student, torch.randn(0, 3, 16, device=device), torch.ones(0, 3, device=device))
    (grad,) = torch.autograd.grad(loss, [student])
    assert loss.item() == 0.0 and grad.shape == student.shape and not grad.any()


@pytest.mark.parametrize("dim, chunks", [(48, 3), (32, 2), (64, 4), (80, 0)])
def test_row_chunks(kernel_device, monkeypatch, dim, chunks):
    """Rows held in registers as 1–4 chunks, and the two-pass loop for longer rows; with 16-wide chunks at
    most, so that every path runs at a small D (at full size: 768 → 3 × 256, > 16384 → the loop)."""
    monkeypatch.setattr(fod_kernels, "MAX_BLOCK_D", 16)
    assert fod_kernels.row_chunks(dim) == (16, chunks)
    device = kernel_device
    gen = torch.Generator().manual_seed(dim)
    student = _make((3, 9, dim), torch.float32, device, "strided_features", gen).requires_grad_()
    teacher = _make((3, 9, dim), torch.float32, device, "transposed", gen).requires_grad_()
    weight = torch.rand(3, 9, generator=gen).to(device)
    grad_loss = torch.tensor(0.7, device=device)
    loss = inc.fod_loss(student, teacher, weight)
    grads = torch.autograd.grad(loss, [student, teacher], grad_loss)
    ref_loss, ref_grads = _reference(student, teacher, weight, 1e-8, True, grad_loss)
    assert_close_rel(loss, ref_loss, torch.float32, "loss")
    for name, grad, ref_grad, x in zip(("student", "teacher"), grads, ref_grads, (student, teacher)):
        floor = _gradient_term_norm(x, weight, 1e-8, grad_loss)
        _assert_close_floor(grad, ref_grad, torch.float32, floor, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_weights_count_as_zero(device, dtype):
    """Weights +1 and −0.999999 would give a loss of 1.4e6 (Σ w ≈ 1e-6). Negative weights are
    clamped at 0 on both paths: the loss and gradients equal those of the clamped weights."""
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(3, 11, 24, generator=gen).to(device, dtype).requires_grad_()
    teacher = torch.randn(3, 11, 24, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.rand(3, 11, generator=gen).to(device) - 0.4  # a third of them negative
    weight[0, 0], weight[0, 1] = 1.0, -0.999999
    loss = inc.fod_loss(student, teacher, weight)
    clamped = inc.fod_loss(student, teacher, weight.clamp_min(0.0))
    assert torch.equal(loss, clamped) and 0.0 <= loss.item() <= 2.0
    grads = torch.autograd.grad(loss, [student, teacher])
    clamped_grads = torch.autograd.grad(clamped, [student, teacher])
    for got, want in zip(grads, clamped_grads):
        assert torch.equal(got, want)
    expected = inc.reference.fod_loss(student.double(), teacher.double(), weight.double().clamp_min(0.0))
    assert_close_rel(loss, expected, dtype, "loss")


def test_a_nan_weight_gives_nan_on_both_paths(device):
    """max(w, 0) keeps a NaN (torch's clamp_min does; the kernels' must too), so a NaN weight reaches the
    trainer's non-finite-loss guard instead of being dropped as a 0."""
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(3, 8, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(3, 8, generator=gen).to(device)
    weight = torch.tensor([1.0, float("nan"), 1.0], device=device)
    loss = inc.fod_loss(student, teacher, weight)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isnan(loss) and torch.isnan(inc.reference.fod_loss(student, teacher, weight))
    assert torch.isnan(grad).all()


def test_weight_gets_no_gradient_and_teacher_none_without_requires_grad(device):
    student = torch.randn(4, 9, device=device, requires_grad=True)
    teacher = torch.randn(4, 9, device=device)
    weight = torch.rand(4, device=device, requires_grad=True)
    inc.fod_loss(student, teacher, weight).backward()
    assert student.grad is not None and weight.grad is None and teacher.grad is None


def test_known_value(device):
    # Row 0: orthogonal (cos 0), row 1: opposite (cos −1), row 2: a zero student row (cos 0, clamped norm).
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], device=device)
    teacher = torch.tensor([[0.0, 3.0], [0.0, -1.0], [1.0, 1.0]], device=device)
    weight = torch.tensor([1.0, 2.0, 1.0], device=device)
    loss = inc.fod_loss(student, teacher, weight)
    assert loss.item() == pytest.approx((1 * 1 + 2 * 2 + 1 * 1) / 4, rel=1e-6)


def test_opcheck(kernel_device):
    device = kernel_device
    gen = torch.Generator().manual_seed(0)
    student = _make((3, 5, 19), torch.float32, device, "slice", gen).requires_grad_()
    teacher = _make((3, 5, 19), torch.float32, device, "transposed", gen).requires_grad_()
    weight = torch.rand(3, 5, generator=gen).to(device)
    torch.library.opcheck(torch.ops.incrementer_fast.fod_loss.default, (student, teacher, weight, 1e-8))
    _, weight_sum = torch.ops.incrementer_fast.fod_loss(student, teacher, weight, 1e-8)
    saved = (student.detach(), teacher.detach(), weight, weight_sum.detach(), 1e-8)
    grad_loss = torch.tensor(1.5, device=device)
    for student_grad, teacher_grad in ((True, True), (True, False)):
        torch.library.opcheck(
            torch.ops.incrementer_fast.fod_loss_backward.default, (grad_loss, *saved, student_grad, teacher_grad)
        )


@pytest.mark.parametrize("eps", [1e-8, 0.1])
def test_gradcheck_float64(device, eps):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    if eps == 0.1:  # rows in the clamped branch ‖x‖ < eps (away from its edge), and a zero row
        student[0, 1] *= 0.05 / student[0, 1].norm()
        teacher[1, 2] *= 0.05 / teacher[1, 2].norm()
        student[1, 0] = 0
    weight = torch.rand(2, 3, generator=gen, dtype=torch.float64).to(device)
    student = student.to(device).requires_grad_()
    teacher = teacher.to(device).requires_grad_()
    # fast_mode checks random projections of the Jacobian: a few op calls instead of one per input element,
    # which keeps the interpreted kernels fast.
    assert torch.autograd.gradcheck(lambda s, t: inc.fod_loss(s, t, weight, eps), (student, teacher), fast_mode=True)


@pytest.mark.plan_independent
def test_torch_compile_fullgraph_matches_eager(device):
    gen = torch.Generator().manual_seed(2)
    class_emb = torch.randn(2, 6, 24, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(2, 4, 24, generator=gen).to(device)
    weight = torch.ones(2, 4, device=device)

    def old_class_term(class_emb, teacher, weight):
        return inc.fod_loss(class_emb[:, :4], teacher, weight)

    compiled = torch.compile(old_class_term, fullgraph=True)
    loss = compiled(class_emb, teacher, weight)
    (grad,) = torch.autograd.grad(loss, [class_emb])
    eager_loss = old_class_term(class_emb, teacher, weight)
    (eager_grad,) = torch.autograd.grad(eager_loss, [class_emb])
    # The compiler may fuse and reorder the reference's float32 arithmetic: the per-dtype bounds, not bits.
    assert_close_rel(loss, eager_loss, torch.float32, "loss")
    assert_close_rel(grad, eager_grad, torch.float32, "grad")


def test_deterministic(device):
    gen = torch.Generator().manual_seed(3)
    # Enough rows for several forward programs and backward blocks.
    student = torch.randn(7, 97, 31, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(7, 97, 31, generator=gen).to(device).requires_grad_()
    weight = torch.rand(7, 97, generator=gen).to(device)
    runs = []
    for _ in range(2):
        loss = inc.fod_loss(student, teacher, weight)
        runs.append((loss, *torch.autograd.grad(loss, [student, teacher])))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_row_layout_needs_no_copy_for_slices_and_transposes():
    class_emb = torch.randn(4, 10, 8)
    old = class_emb[:, :6]
    student, teacher, weight, inner_size, _ = row_layout(old, old, torch.ones(4, 6))
    assert student.data_ptr() == class_emb.data_ptr() and inner_size == 6
    tokens = torch.randn(12, 4, 8).transpose(0, 1)  # (N, B, D) storage seen as (B, N, D)
    student, _, _, inner_size, strides = row_layout(tokens, tokens, torch.ones(4, 12))
    assert student.data_ptr() == tokens.data_ptr() and inner_size == 12 and strides[0] == (8, 32)
    permuted = torch.randn(2, 3, 5, 8).permute(2, 1, 0, 3)  # three row dims that no two strides merge
    student, _, _, _, _ = row_layout(permuted, permuted, torch.ones(5, 3, 2))
    assert student.is_contiguous()


@pytest.mark.parametrize(
    "student_shape, teacher_shape, weight_shape, named",
    [
        ((2, 5, 8), (2, 5, 9), (2, 5), "teacher"),
        ((2, 5, 8), (2, 4, 8), (2, 5), "teacher"),
        ((2, 5, 8), (2, 5, 8), (2, 4), "weight"),
        ((2, 5, 8), (2, 5, 8), (2, 5, 8), "weight"),
        ((), (), (), "student"),
    ],
)
def test_bad_shapes_raise_value_error(student_shape, teacher_shape, weight_shape, named):
    with pytest.raises(ValueError, match=named):
        inc.fod_loss(torch.randn(student_shape), torch.randn(teacher_shape), torch.rand(weight_shape))


def test_bad_dtypes_devices_and_eps():
    s, t, w = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(2, 3)
    with pytest.raises(TypeError, match="student"):
        inc.fod_loss(torch.ones(2, 3, 4, dtype=torch.int64), t, w)
    with pytest.raises(TypeError, match="teacher"):
        inc.fod_loss(s, torch.ones(2, 3, 4, dtype=torch.int32), w)
    with pytest.raises(TypeError, match="weight"):
        inc.fod_loss(s, t, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher on meta"):
        inc.fod_loss(s, t.to("meta"), w)
    with pytest.raises(ValueError, match="eps"):
        inc.fod_loss(s, t, w, eps=0.0)
    for eps in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a positive finite float"):
            inc.fod_loss(s, t, w, eps=eps)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_more_than_2_31_elements_cuda():
    # 2^31 + 2^14 fp16 elements per input: offsets past 2^31 must be int64. Only a few rows carry weight
    # (some past the 2^31-th element), so the float64 reference can be evaluated on those rows alone.
    dim = 128
    rows = 2**31 // dim + 128
    student = torch.randn(rows, dim, device="cuda", dtype=torch.float16).requires_grad_()
    teacher = torch.randn(rows, dim, device="cuda", dtype=torch.float16).requires_grad_()
    picked = torch.tensor([0, 5, rows // 2, rows - 129, rows - 2, rows - 1], device="cuda")
    weight = torch.zeros(rows, device="cuda")
    weight[picked] = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.5], device="cuda")
    loss = inc.fod_loss(student, teacher, weight, eps=1e-3)
    grad_student, grad_teacher = torch.autograd.grad(loss, [student, teacher])
    s = student.detach()[picked].double().requires_grad_()
    t = teacher.detach()[picked].double().requires_grad_()
    ref = inc.reference.fod_loss(s, t, weight[picked].double(), 1e-3)
    ref_gs, ref_gt = torch.autograd.grad(ref, [s, t])
    assert_close_rel(loss, ref, torch.float16, "loss")
    assert_close_rel(grad_student[picked], ref_gs.half().double(), torch.float16, "grad of student")
    assert_close_rel(grad_teacher[picked], ref_gt.half().double(), torch.float16, "grad of teacher")
    unpicked = weight == 0
    assert torch.count_nonzero(grad_student[unpicked]) == 0 and torch.count_nonzero(grad_teacher[unpicked]) == 0


def test_completion_counter_is_reset_after_a_failed_launch():
    """The one-launch reductions share a counter per device and stream; a launch that raises must leave it at 0
    for the next one (kernels/utils.py, completion_counter)."""
    from incrementer_fast.kernels.utils import completion_counter

    device = torch.device("cpu")
    with pytest.raises(RuntimeError, match="half-way"):
        with completion_counter(device) as counter:
            counter += 3  # programs that incremented it before the failure
            raise RuntimeError("stopped half-way")
    with completion_counter(device) as counter:
        assert counter.item() == 0


def test_completion_counter_is_real_under_fake_mode():
    """Launches planned on fake tensors (the ledger, torch.compile's tracing) get the CPU's real counter, made
    at import: no torch op is issued for it, and later real launches never get a fake one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from incrementer_fast.kernels import utils

    device = torch.device("cpu")
    with FakeTensorMode(), utils.completion_counter(device) as counter:
        assert type(counter) is torch.Tensor
    with utils.completion_counter(device) as counter:
        assert type(counter) is torch.Tensor and counter.item() == 0
