"""Parity tests of `incrementer_fast.cosine_mask` (the custom op and its kernels) against the float64 reference.

Run on the CPU without TRITON_INTERPRET (the op dispatches to the reference: its properties are checked)
and with TRITON_INTERPRET=1 (the Triton kernels through the interpreter, with the interpreter's and a GPU's
launch plans); on CUDA when a GPU is present.
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import incrementer_fast as inc
from helpers import REL_ERR_BOUND, assert_close_rel, fewer_examples_interpreted

# The `device` fixture only names a device, so reusing it across hypothesis examples is safe. (Extends the
# loaded profile's list rather than replacing it.)
fixture_ok = settings(
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture]
)
# The parity property draws shapes up to 160 × 160 × 200: under the GPU plans through the interpreter, hundreds
# of small programs an example (its explicit examples cross every tile edge).
PARITY_SETTINGS = fewer_examples_interpreted(fixture_ok)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1, primes, non-powers of two, and sizes crossing the kernels' 64-wide tiles.
ROWS = [1, 2, 5, 13, 16, 31, 64, 97, 131, 160]
DIMS = [1, 3, 7, 16, 33, 64, 127, 200]
LAYOUTS = ["contiguous", "transposed", "strided", "batch_expanded"]
GRADS = ["random", "ones_expanded", "transposed"]


def _eps_for(dtype, wide_eps):
    # Gradients of rows with ‖x‖ < eps scale as 1/eps: 1e8 overflows fp16 (max 65504), as in the reference.
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2
    return 1e-2 if wide_eps else 1e-8


def _magnitudes(dtype, eps):
    """Row norms: zero, below eps (the clamped branch), just above it, regular, large for the dtype."""
    if dtype in (torch.float16, torch.bfloat16):
        return [0.0, 1e-3, 0.05, 1.0, 100.0]
    return [0.0, eps * 1e-2, eps * 10, 1.0, 1e6]


def _make(shape, dtype, device, layout, gen, magnitudes):
    """A (B, R, D) tensor in the given memory layout whose rows are scaled by magnitudes drawn per row."""
    batch, rows, dim = shape
    values = torch.randn(shape, generator=gen, dtype=torch.float64)
    choice = torch.randint(len(magnitudes), (batch, rows, 1), generator=gen)
    values = values * torch.tensor(magnitudes, dtype=torch.float64)[choice]
    values = values.to(device=device, dtype=dtype)
    if layout == "contiguous":
        return values.clone()
    if layout == "transposed":  # D is the slow axis in memory
        return values.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":  # every other feature of a wider tensor, rows cut out of a taller one
        wide = torch.zeros((batch, rows + 2, 2 * dim), dtype=dtype, device=device)
        wide[:, 1 : rows + 1, ::2] = values
        return wide[:, 1 : rows + 1, ::2]
    if layout == "batch_expanded":  # one set of rows shared by the batch (stride 0), like learned class tokens
        return values[:1].clone().expand(batch, rows, dim)
    raise AssertionError(layout)


def _upstream(kind, shape, dtype, device, gen):
    batch, classes, patches = shape
    if kind == "random":
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if kind == "ones_expanded":  # what the backward of masks.sum() receives: stride 0 everywhere
        return torch.ones((), dtype=dtype, device=device).expand(shape)
    if kind == "transposed":
        g = torch.randn((batch, patches, classes), generator=gen, dtype=torch.float64)
        return g.to(device=device, dtype=dtype).transpose(1, 2)
    raise AssertionError(kind)


def _normalize(x, eps):
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def _assert_grad_close(actual, expected, natural, dtype, what):
    """Relative-norm error of a gradient, measured against the larger of its norm and its natural scale.

    The input gradients are a projection, (dx̂ − x̂⟨x̂, dx̂⟩)/‖x‖, whose result can be far smaller than its
    terms (with D = 1 it is exactly 0 for every unclamped row): rounding errors are relative to the terms,
    ‖dx̂‖/‖x‖ (`natural`), not to the difference. When nothing cancels, ‖expected‖ ≈ ‖natural‖ and this is
    the plain relative-norm error.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.double()).all(), f"{what}: non-finite values"
    diff = torch.linalg.vector_norm(actual.double().cpu() - expected.double().cpu()).item()
    scale = max(torch.linalg.vector_norm(expected.double()).item(), torch.linalg.vector_norm(natural).item())
    err = diff / scale if scale > 0 else diff
    assert err <= REL_ERR_BOUND[dtype], f"{what}: relative-norm error {err:.3e} > {REL_ERR_BOUND[dtype]:.1e} ({dtype})"


def _expected(patches, classes, scale, eps, upstream):
    """Forward and gradients of the float64 reference, plus the natural scales of the gradients."""
    p = patches.detach().double().requires_grad_()
    c = classes.detach().double().requires_grad_()
    s = scale.detach().double().requires_grad_() if isinstance(scale, torch.Tensor) else scale
    masks = inc.reference.cosine_mask(p, c, s, eps)
    g = upstream.double()
    wrt = [p, c] + ([s] if isinstance(s, torch.Tensor) else [])
    grads = torch.autograd.grad(masks, wrt, g)
    with torch.no_grad():
        s_value = s if isinstance(s, float) else s.item()
        p_hat, c_hat = _normalize(p, eps), _normalize(c, eps)
        inv_p = 1.0 / torch.linalg.vector_norm(p, dim=-1, keepdim=True).clamp_min(eps)
        inv_c = 1.0 / torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min(eps)
        natural_p = s_value * torch.bmm(g.transpose(1, 2), c_hat) * inv_p
        natural_c = s_value * torch.bmm(g, p_hat) * inv_c
        # ds = Σ dM·raw: a sum of terms of either sign, so its natural scale is Σ |dM·raw|.
        natural_s = (g * torch.bmm(c_hat, p_hat.transpose(1, 2))).abs().sum()
    return masks.detach(), grads, (natural_p.cpu(), natural_c.cpu(), natural_s.cpu())


@PARITY_SETTINGS
@given(
    batch=st.integers(1, 3),
    num_patches=st.sampled_from(ROWS),
    num_classes=st.sampled_from(ROWS),
    dim=st.sampled_from(DIMS),
    dtype=st.sampled_from(DTYPES),
    patches_layout=st.sampled_from(LAYOUTS),
    classes_layout=st.sampled_from(LAYOUTS),
    grad_kind=st.sampled_from(GRADS),
    scale_kind=st.sampled_from(["float", "tensor_grad", "tensor_fp32_grad", "tensor_no_grad"]),
    scale_value=st.sampled_from([1.0, -2.0, 0.0, 0.37, 1.7]),
    wide_eps=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(  # every kernel crosses several tiles in every dimension, with ragged edges
    batch=2, num_patches=131, num_classes=97, dim=127, dtype=torch.float32, patches_layout="transposed",
    classes_layout="batch_expanded", grad_kind="random", scale_kind="tensor_grad", scale_value=1.7,
    wide_eps=False, seed=1,
)
@example(  # D = 1: every unclamped row's gradient is exactly 0, only rounding remains
    batch=3, num_patches=13, num_classes=5, dim=1, dtype=torch.float32,
    patches_layout="contiguous", classes_layout="strided", grad_kind="ones_expanded", scale_kind="float",
    scale_value=-2.0, wide_eps=False, seed=2,
)
def test_forward_and_gradients_match_reference(
    device, batch, num_patches, num_classes, dim, dtype, patches_layout, classes_layout, grad_kind, scale_kind,
    scale_value, wide_eps, seed,
):
    gen = torch.Generator().manual_seed(seed)
    eps = _eps_for(dtype, wide_eps)
    magnitudes = _magnitudes(dtype, eps)
    patches = _make((batch, num_patches, dim), dtype, device, patches_layout, gen, magnitudes)
    classes = _make((batch, num_classes, dim), dtype, device, classes_layout, gen, magnitudes)
    # Views of tensors without history are leaves: the op sees their strides (0 for batch_expanded).
    patches.requires_grad_()
    classes.requires_grad_()
    if scale_kind == "float":
        scale = scale_value
    else:
        scale_dtype = torch.float32 if scale_kind == "tensor_fp32_grad" else dtype
        scale = torch.tensor(scale_value, dtype=scale_dtype, device=device)
        scale.requires_grad_(scale_kind != "tensor_no_grad")

    masks = inc.cosine_mask(patches, classes, scale, eps)
    upstream = _upstream(grad_kind, masks.shape, dtype, device, gen)
    expected_masks, expected_grads, natural = _expected(patches, classes, scale, eps, upstream)

    assert masks.dtype == dtype and masks.is_contiguous()
    assert_close_rel(masks, expected_masks, dtype, "masks")

    scale_needs_grad = isinstance(scale, torch.Tensor) and scale.requires_grad
    grads = torch.autograd.grad(masks, [patches, classes] + ([scale] if scale_needs_grad else []), upstream)
    for index, name in enumerate(("patches", "classes")):
        assert grads[index].dtype == dtype, f"grad {name}: dtype {grads[index].dtype}"
        _assert_grad_close(grads[index], expected_grads[index], natural[index], dtype, f"grad {name}")
    if scale_needs_grad:
        got = grads[-1]
        assert got.dtype == scale.dtype and got.shape == ()
        # fp32 accumulation of the sum, then the cast to the scale's dtype
        bound = max(REL_ERR_BOUND[dtype], REL_ERR_BOUND[scale.dtype])
        err = abs(got.double().item() - expected_grads[2].item()) / max(natural[2].item(), 1e-300)
        assert err <= bound, f"grad scale: error {err:.3e} relative to Σ|dM·raw| > {bound:.1e}"


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
     (torch.float32, torch.float64), (torch.bfloat16, torch.bfloat16)],
    ids=str,
)
def test_out_dtype(device, dtype, out_dtype):
    """Masks rounded once to out_dtype (fp32 masks from bf16 inputs keep fp32 resolution near ±scale);
    the gradients come back in the inputs' dtype, from an upstream gradient in out_dtype."""
    gen = torch.Generator().manual_seed(11)
    patches = _make((2, 70, 40), dtype, device, "transposed", gen, [1.0, 3.0]).requires_grad_()
    classes = _make((2, 9, 40), dtype, device, "contiguous", gen, [1.0, 0.5]).requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float32, device=device, requires_grad=True)
    masks = inc.cosine_mask(patches, classes, scale, out_dtype=out_dtype)
    assert masks.dtype == out_dtype and masks.is_contiguous()
    upstream = _upstream("random", masks.shape, out_dtype, device, gen)
    expected_masks, expected_grads, natural = _expected(patches, classes, scale, 1e-8, upstream)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    # One rounding to out_dtype after an fp32 computation on the (exactly representable) inputs.
    assert_close_rel(masks, expected_masks, max(out_dtype, compute, key=REL_ERR_BOUND.get), "masks")
    reference = inc.reference.cosine_mask(patches.detach(), classes.detach(), 10.0, out_dtype=out_dtype)
    assert reference.dtype == out_dtype
    grads = torch.autograd.grad(masks, (patches, classes, scale), upstream)
    for index, name in enumerate(("patches", "classes")):
        assert grads[index].dtype == dtype, f"grad {name}: dtype {grads[index].dtype}"
        _assert_grad_close(grads[index], expected_grads[index], natural[index], dtype, f"grad {name}")
    assert grads[2].dtype == torch.float32


def test_out_dtype_compiles_and_passes_opcheck(kernel_device):
    device = kernel_device
    patches, classes = _small_inputs(device, torch.bfloat16)
    scale = torch.tensor(2.0, device=device)
    forward = torch.ops.incrementer_fast.cosine_mask.default
    torch.library.opcheck(forward, (patches.requires_grad_(), classes.requires_grad_(), scale, 0.0, 1e-8,
                                    torch.float32))

    def loss_fn(p, c):
        return inc.cosine_mask(p, c, 10.0, out_dtype=torch.float32).square().sum()

    eager = torch.autograd.grad(loss_fn(patches, classes), (patches, classes))
    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    out = compiled_fn(patches, classes)
    assert out.dtype == torch.float32
    compiled = torch.autograd.grad(out, (patches, classes))
    for got, want in zip(compiled, eager):
        assert got.dtype == torch.bfloat16
        assert_close_rel(got, want, torch.bfloat16)


@pytest.mark.parametrize("num_classes", [21, 70])
def test_gpu_launch_plan(kernel_device, num_classes):
    """The tiles and grids planned for an H100/H200 (132 SMs: small tiles, many programs, K = 21 in 8-wide
    class tiles), which the interpreter otherwise trades for its own fewest-programs plan (CUDA tensors
    follow their own GPU whatever the plan)."""
    with inc.use_backend("triton", plan="h100"):
        _check_strided_case(kernel_device, num_classes)


def _check_strided_case(device, num_classes):
    gen = torch.Generator().manual_seed(13)
    patches = _make((2, 70, 40), torch.float32, device, "transposed", gen, [1.0, 1e-9]).requires_grad_()
    classes = _make((2, num_classes, 40), torch.float32, device, "strided", gen, [1.0, 2.0]).requires_grad_()
    scale = torch.tensor(-1.5, device=device, requires_grad=True)
    masks = inc.cosine_mask(patches, classes, scale)
    upstream = _upstream("transposed", masks.shape, torch.float32, device, gen)
    expected_masks, expected_grads, natural = _expected(patches, classes, scale, 1e-8, upstream)
    assert_close_rel(masks, expected_masks, torch.float32, "masks")
    grads = torch.autograd.grad(masks, (patches, classes, scale), upstream)
    for index, name in enumerate(("patches", "classes")):
        _assert_grad_close(grads[index], expected_grads[index], natural[index], torch.float32, f"grad {name}")
    err = abs(grads[2].item() - expected_grads[2].item()) / natural[2].item()
    assert err <= REL_ERR_BOUND[torch.float32], f"grad scale: {err:.3e}"


def _small_inputs(device, dtype=torch.float32, batch=2, num_patches=5, num_classes=3, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(batch, num_patches, dim, generator=gen, dtype=torch.float64)
    classes = torch.randn(batch, num_classes, dim, generator=gen, dtype=torch.float64)
    return patches.to(device, dtype), classes.to(device, dtype)


def test_opcheck(kernel_device):
    device = kernel_device
    patches, classes = _small_inputs(device)
    patches[0, 1] = 0.0  # a zero row: the clamped branch
    transposed = classes.transpose(1, 2).contiguous().transpose(1, 2)
    scale = torch.tensor(1.5, device=device)
    forward = torch.ops.incrementer_fast.cosine_mask.default
    backward = torch.ops.incrementer_fast.cosine_mask_backward.default
    for p, c, s in [
        (patches.requires_grad_(), transposed.requires_grad_(), scale.requires_grad_()),
        (patches.detach(), classes, scale.detach()),
    ]:
        torch.library.opcheck(forward, (p, c, s, 0.0, 1e-8, torch.float32))
    # A Python-float scale: no tensor, the value passed as a float
    torch.library.opcheck(forward, (patches.detach().requires_grad_(), classes, None, -0.75, 1e-8, torch.float32))
    masks, _, norm_p, norm_c = forward(patches.detach(), transposed.detach(), scale.detach(), 0.0, 1e-8,
                                       torch.float32)
    # bf16 masks of fp32 inputs: the forward also returns fp32 masks for the backward
    _, exact, _, _ = forward(patches.detach(), classes, scale.detach(), 0.0, 1e-8, torch.bfloat16)
    assert exact.dtype == torch.float32 and exact.shape == masks.shape
    torch.library.opcheck(forward, (patches.detach(), classes, scale.detach(), 0.0, 1e-8, torch.bfloat16))
    grad = torch.randn(2, 3, 5, device=device)
    ones = torch.ones((), device=device).expand(2, 3, 5)
    saved = (masks, norm_p, norm_c, 1e-8)
    torch.library.opcheck(backward, (grad, patches.detach(), transposed.detach(), None, 1.5, *saved, True, True, False))
    for g, needs in [(grad, (True, True, True)), (ones, (True, False, False)), (grad, (False, True, False)),
                     (grad, (False, False, True))]:
        torch.library.opcheck(backward, (g, patches.detach(), transposed.detach(), scale.detach(), 0.0, *saved,
                                         *needs))


def test_gradcheck(device):
    patches, classes = _small_inputs(device, torch.float64)
    eps = 0.5  # wide, so that the rows scaled below it exercise the clamped branch
    patches[0, :2] *= 0.05
    classes[1, 0] *= 0.05
    scale = torch.tensor(1.3, dtype=torch.float64, device=device, requires_grad=True)
    patches.requires_grad_()
    classes.requires_grad_()
    # fast_mode checks random projections of the Jacobian: a few op calls instead of one per input element.
    assert torch.autograd.gradcheck(
        lambda p, c, s: inc.cosine_mask(p, c, s, eps), (patches, classes, scale), fast_mode=True
    )


@pytest.mark.plan_independent
def test_compiled_matches_eager(device):
    patches, classes = _small_inputs(device, num_patches=37, num_classes=6, dim=20, seed=3)
    weight = torch.randn(2, 6, 37, generator=torch.Generator().manual_seed(4)).to(device)

    def loss_fn(p, c, s):
        learned = inc.cosine_mask(p, c, s)  # learnable temperature
        fixed = inc.cosine_mask(p, c, 0.5)  # Python float scale
        return (learned * weight).sum() + fixed.square().sum()

    def run(fn):
        p = patches.clone().requires_grad_()
        c = classes.clone().requires_grad_()
        s = torch.tensor(2.0, device=device, requires_grad=True)
        loss = fn(p, c, s)
        loss.backward()
        return loss.detach(), p.grad, c.grad, s.grad

    eager = run(loss_fn)
    compiled = run(torch.compile(loss_fn, fullgraph=True))
    for name, got, want in zip(("loss", "grad patches", "grad classes", "grad scale"), compiled, eager):
        assert_close_rel(got, want, torch.float32, name)


def test_backward_is_deterministic(device):
    # Two tiles along every axis, so partial sums are actually combined.
    patches, classes = _small_inputs(device, batch=2, num_patches=97, num_classes=70, dim=96, seed=5)
    gen = torch.Generator().manual_seed(6)
    upstream = torch.randn(2, 70, 97, generator=gen).to(device)

    def grads():
        p = patches.clone().requires_grad_()
        c = classes.clone().requires_grad_()
        s = torch.tensor(0.8, device=device, requires_grad=True)
        masks = inc.cosine_mask(p, c, s)
        return torch.autograd.grad(masks, (p, c, s), upstream)

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("shape", [(2, 0, 3, 4), (2, 5, 0, 4), (2, 5, 3, 0), (0, 5, 3, 4)])
def test_empty_dimensions(device, shape):
    batch, num_patches, num_classes, dim = shape
    patches = torch.randn(batch, num_patches, dim, device=device, requires_grad=True)
    classes = torch.randn(batch, num_classes, dim, device=device, requires_grad=True)
    scale = torch.tensor(2.0, device=device, requires_grad=True)
    masks = inc.cosine_mask(patches, classes, scale)
    assert masks.shape == (batch, num_classes, num_patches)
    # D = 0: every row is the zero vector, so every mask entry is 0.
    assert torch.equal(masks, torch.zeros_like(masks))
    grad_p, grad_c, grad_s = torch.autograd.grad(masks, (patches, classes, scale), torch.ones_like(masks))
    assert grad_p.shape == patches.shape and grad_c.shape == classes.shape
    assert not grad_p.any() and not grad_c.any() and grad_s.item() == 0.0


def _bad_inputs():
    p = torch.randn(2, 5, 4)
    c = torch.randn(2, 3, 4)
    meta = torch.device("meta")
    return [
        ((p[0], c, 1.0), ValueError, ["patches", "(5, 4)"]),
        ((p, c.unsqueeze(0), 1.0), ValueError, ["classes", "(1, 2, 3, 4)"]),
        ((p, torch.randn(3, 3, 4), 1.0), ValueError, ["(2, 5, 4)", "(3, 3, 4)"]),
        ((p, torch.randn(2, 3, 6), 1.0), ValueError, ["(2, 5, 4)", "(2, 3, 6)"]),
        ((p.long(), c, 1.0), TypeError, ["patches", "torch.int64"]),
        ((p, c.int(), 1.0), TypeError, ["classes", "torch.int32"]),
        ((p, c.double(), 1.0), TypeError, ["patches", "classes"]),
        (([[1.0]], c, 1.0), TypeError, ["patches"]),
        ((p, c, torch.ones(1)), ValueError, ["scale", "(1,)"]),
        ((p, c, torch.tensor(2)), TypeError, ["scale"]),
        ((p, c, "2.0"), TypeError, ["scale"]),
        ((p, c, 1.0, -1e-8), ValueError, ["eps"]),
        ((p, c, float("nan")), ValueError, ["scale must be a finite float", "nan"]),
        ((p, c, float("-inf")), ValueError, ["scale must be a finite float", "-inf"]),
        ((p, c, 1.0, 1e-8, torch.int32), TypeError, ["out_dtype", "torch.int32"]),
        ((p, c.to(meta), 1.0), ValueError, ["patches on cpu", "classes on meta"]),
        ((p, c, torch.tensor(1.0, device=meta)), ValueError, ["scale on meta"]),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_inputs_raise(index):
    args, error, fragments = _bad_inputs()[index]
    with pytest.raises(error) as info:
        inc.cosine_mask(*args)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (about 10 GB)")
def test_more_than_2_31_mask_elements():
    """(1, 32769, 65537) fp16 masks: 2^31 + 98305 elements, 4.3 GB; the upstream gradient as large again.

    The upstream gradient is the materialised rank-1 tensor a_k·b_n (small integers: exact in fp16), so the
    expected results stay cheap: Σ dM∘masks = s·⟨Σ_n b_n p̂_n, Σ_k a_k ĉ_k⟩, differentiated in float64.
    """
    device = torch.device("cuda")
    num_classes, num_patches, dim, dtype, eps = 32769, 65537, 8, torch.float16, 1e-8
    assert num_classes * num_patches > 2**31
    gen = torch.Generator().manual_seed(7)
    patches = torch.randn(1, num_patches, dim, generator=gen).to(device, dtype).requires_grad_()
    classes = torch.randn(1, num_classes, dim, generator=gen).to(device, dtype).requires_grad_()
    a = torch.randint(-8, 9, (num_classes,), generator=gen).to(device, dtype)
    b = torch.randint(-8, 9, (num_patches,), generator=gen).to(device, dtype)
    scale = 1.5

    masks = inc.cosine_mask(patches, classes, scale, eps)
    p64 = patches.detach().double().requires_grad_()
    c64 = classes.detach().double().requires_grad_()
    p_hat, c_hat = _normalize(p64, eps), _normalize(c64, eps)
    # The first rows, and the last ones, which lie past element 2^31 of the output.
    for rows in (torch.arange(0, 3, device=device), torch.arange(num_classes - 3, num_classes, device=device)):
        expected = scale * torch.bmm(c_hat[:, rows], p_hat.transpose(1, 2)).detach()
        assert_close_rel(masks[:, rows], expected, dtype, f"masks rows {rows.tolist()}")

    upstream = (a[:, None] * b[None, :]).unsqueeze(0)
    grad_p, grad_c = torch.autograd.grad(masks, (patches, classes), upstream)
    del masks, upstream
    weighted_p = torch.einsum("n,bnd->bd", b.double(), p_hat)
    weighted_c = torch.einsum("k,bkd->bd", a.double(), c_hat)
    objective = scale * (weighted_p * weighted_c).sum()
    expected_p, expected_c = torch.autograd.grad(objective, (p64, c64))
    assert_close_rel(grad_p, expected_p, dtype, "grad patches")
    assert_close_rel(grad_c, expected_c, dtype, "grad classes")
