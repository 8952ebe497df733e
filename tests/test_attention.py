"""incrementer_fast.attention: backend choice, SDPA parity with timm's attention, forced-backend errors,
and (with a GPU and xformers) the xformers custom op against SDPA, eager and compiled."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import ZeroFills, assert_close_rel
from timm.layers import Attention as TimmAttention

import incrementer_fast.attention as attention_module

from incrementer_fast.attention import (
    ENV_VAR,
    XFORMERS_INSTALLED,
    Attention,
    attention,
    requested_backend,
    resolve_backend,
)

CUDA_XFORMERS = pytest.mark.skipif(
    not (torch.cuda.is_available() and XFORMERS_INSTALLED), reason="needs CUDA and xformers"
)


def explicit_attention(q, k, v):
    """softmax(q·kᵀ/√Dh)·v written out, evaluated in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    return weights @ v


@pytest.mark.parametrize(
    "shape",
    [
        # (B, heads, Mq, Mk, Dh, Dv): self-attention, cross-attention, one token, odd sizes
        (2, 3, 7, 7, 16, 16),
        (1, 1, 1, 1, 8, 8),
        (3, 2, 5, 11, 12, 20),
    ],
)
def test_sdpa_matches_explicit_formula(shape, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    b, h, mq, mk, dh, dv = shape
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, mq, dh, generator=generator)
    k = torch.randn(b, h, mk, dh, generator=generator)
    v = torch.randn(b, h, mk, dv, generator=generator)
    out = attention(q, k, v)
    assert out.shape == (b, h, mq, dv)
    assert_close_rel(out, explicit_attention(q, k, v), torch.float32, "attention")


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_module_matches_timm_attention_with_same_weights(qk_norm, fused):
    torch.manual_seed(0)
    norm_layer = torch.nn.LayerNorm if qk_norm else None
    kwargs = dict(num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=norm_layer)
    ours = Attention(32, **kwargs).eval()
    timm_attention = TimmAttention(32, **kwargs).eval()
    if qk_norm:  # non-trivial norm weights so that a skipped q_norm/k_norm would show
        for norm in (ours.q_norm, ours.k_norm):
            torch.nn.init.normal_(norm.weight)
    timm_attention.load_state_dict(ours.state_dict())
    timm_attention.fused_attn = fused  # False: timm's explicit softmax path; True: timm's own SDPA call
    ours.backend = "sdpa"
    x = torch.randn(2, 9, 32)
    assert_close_rel(ours(x), timm_attention(x), torch.float32, f"qk_norm={qk_norm} fused={fused}")


def test_env_var_selects_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert requested_backend() == "auto"
    assert resolve_backend(cpu, torch.float32) == "sdpa"  # auto on CPU: xformers has no CPU operator
    # "auto" is SDPA until a GPU measurement shows xformers at least as fast (incrementer_fast/attention.py);
    # it decides from the request alone, so the CUDA rule is checked without a GPU.
    assert resolve_backend(torch.device("cuda"), torch.float32) == "sdpa"
    assert resolve_backend(torch.device("cuda"), torch.bfloat16) == "sdpa"
    if XFORMERS_INSTALLED:
        assert resolve_backend(torch.device("cuda"), torch.bfloat16, "xformers") == "xformers"
    monkeypatch.setenv(ENV_VAR, "SDPA")
    assert requested_backend() == "sdpa"
    monkeypatch.setenv(ENV_VAR, "xformers")
    assert requested_backend() == "xformers"
    # an explicit argument wins over the environment
    q = torch.randn(1, 2, 3, 8)
    assert resolve_backend(cpu, torch.float32, "sdpa") == "sdpa"
    assert attention(q, q, q, backend="sdpa").shape == q.shape
    monkeypatch.setenv(ENV_VAR, "flash")
    with pytest.raises(ValueError, match=ENV_VAR):
        attention(q, q, q)
    with pytest.raises(ValueError, match="attention backend"):
        attention(q, q, q, backend="flash")


def test_forced_xformers_on_cpu_is_an_error(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="no CPU operator"):
        attention(q, q, q, backend="xformers")
    monkeypatch.setenv(ENV_VAR, "xformers")
    with pytest.raises(RuntimeError, match="no CPU operator"):
        attention(q, q, q)
    module = Attention(16, num_heads=2)
    with pytest.raises(RuntimeError, match="no CPU operator"):
        module(torch.randn(1, 4, 16))


@pytest.mark.skipif(XFORMERS_INSTALLED, reason="checks the error when xformers is not installed")
def test_forced_xformers_not_installed_is_an_error():
    # Decided from the device type only: no CUDA tensor (and no GPU) is needed to check it.
    with pytest.raises(RuntimeError, match="not installed"):
        resolve_backend(torch.device("cuda"), torch.float16, "xformers")
    assert resolve_backend(torch.device("cuda"), torch.float16, "auto") == "sdpa"


def test_bad_qkv_shapes_are_value_errors():
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"q must be 4-D .*\(2, 15, 8\)"):
        attention(q.reshape(2, 15, 8), q, q)
    with pytest.raises(ValueError, match="agree in B and heads"):
        attention(q, q[:1], q[:1])
    with pytest.raises(ValueError, match="agree in Dh"):
        attention(q, torch.randn(2, 3, 5, 4), q)
    with pytest.raises(ValueError, match="attn_mask"):
        Attention(16, num_heads=2)(torch.randn(1, 4, 16), attn_mask=torch.zeros(4, 4))


@CUDA_XFORMERS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_matches_sdpa_forward_and_backward(dtype):
    torch.manual_seed(0)
    shape = (2, 3, 197, 64)
    inputs = [torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
    upstream = torch.randn(shape, device="cuda", dtype=dtype)
    results = {}
    for backend in ("xformers", "sdpa"):
        out = attention(*inputs, backend=backend)
        grads = torch.autograd.grad(out, inputs, upstream)
        results[backend] = (out, *grads)
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["xformers"], results["sdpa"]):
        assert_close_rel(a, b, dtype, name)


@CUDA_XFORMERS
def test_xformers_custom_op_opcheck_and_compile():
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, 50, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    torch.library.opcheck(torch.ops.incrementer_fast.xformers_attention_train.default, (q, k, v))
    torch.library.opcheck(torch.ops.incrementer_fast.xformers_attention.default, tuple(t.detach() for t in (q, k, v)))
    out, lse = torch.ops.incrementer_fast.xformers_attention_train(q, k, v)
    assert lse.shape == (2, 4, 50)  # cut to (B, H, Mq) whichever xformers operator ran
    saved = tuple(t.detach() for t in (q, k, v, out, lse))
    torch.library.opcheck(torch.ops.incrementer_fast.xformers_attention_backward.default, (torch.randn_like(out), *saved))

    def step(q, k, v):
        return attention(q, k, v, backend="xformers").square().sum()

    eager = torch.autograd.grad(step(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True)(q, k, v), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), compiled, eager):
        assert_close_rel(a, b, torch.bfloat16, name)


class _SplitApiStandIn:
    """A plain-PyTorch stand-in for the three functions of ``xformers.ops`` that incrementer_fast.attention
    calls, so that the custom ops' wiring is checked on the CPU (xformers has no CPU operator). It counts its
    calls, pads the log-sum-exp to a multiple of 32 along Mq like xformers' cutlass operator, and its
    backward computes the gradients from the given output and log-sum-exp alone (FlashAttention's
    formulas), so a wrong saved tensor gives wrong gradients. The real xformers is checked on CUDA below."""

    def __init__(self):
        self.calls = Counter()

    @staticmethod
    def _scores(q, k):  # (B, Mq, H, D), (B, Mk, H, D) → (B, H, Mq, Mk), float32
        return torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5

    def memory_efficient_attention(self, q, k, v):
        self.calls["memory_efficient_attention"] += 1
        probs = torch.softmax(self._scores(q, k), dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)

    def memory_efficient_attention_forward_requires_grad(self, q, k, v):
        self.calls["forward_requires_grad"] += 1
        scores = self._scores(q, k)
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v.float()).to(q.dtype)
        padding = -lse.shape[-1] % 32
        return out, F.pad(lse, (0, padding), value=float("inf"))

    def memory_efficient_attention_backward(self, grad, out, lse, q, k, v):
        self.calls["backward"] += 1
        assert lse.shape[-1] >= q.shape[1] and lse.dtype == torch.float32
        probs = torch.exp(self._scores(q, k) - lse[..., : q.shape[1], None])
        grad, out = grad.float(), out.float()
        grad_v = torch.einsum("bhqk,bqhd->bkhd", probs, grad)
        grad_probs = torch.einsum("bqhd,bkhd->bhqk", grad, v.float())
        row = torch.einsum("bqhd,bqhd->bhq", grad, out)
        grad_scores = probs * (grad_probs - row[..., None]) * q.shape[-1] ** -0.5
        grad_q = torch.einsum("bhqk,bkhd->bqhd", grad_scores, k.float())
        grad_k = torch.einsum("bhqk,bqhd->bkhd", grad_scores, q.float())
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


@pytest.fixture
def split_api(monkeypatch):
    stand_in = _SplitApiStandIn()
    monkeypatch.setattr(attention_module, "_import_xformers_ops", lambda: stand_in)
    return stand_in


def _bmhk_inputs(shape=(2, 37, 3, 16), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3)]


def _sdpa_bmhk(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def test_xformers_training_op_reuses_the_forward(split_api):
    """The training op saves xformers' output and log-sum-exp; its backward calls xformers' backward with
    them and never recomputes the forward; the gradients are SDPA's."""
    q, k, v = _bmhk_inputs()
    upstream = torch.randn(2, 37, 3, 16, generator=torch.Generator().manual_seed(1))
    out, lse = torch.ops.incrementer_fast.xformers_attention_train(q, k, v)
    assert lse.shape == (2, 3, 37) and lse.dtype == torch.float32 and lse.is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    assert split_api.calls == Counter(forward_requires_grad=1, backward=1)
    expected = _sdpa_bmhk(q, k, v)
    assert_close_rel(out, expected, torch.float32, "out")
    for name, got, want in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(expected, (q, k, v), upstream)):
        assert_close_rel(got, want, torch.float32, name)


def test_xformers_training_backward_fills_no_zero_lse_gradient(split_api):
    """The log-sum-exp never gets a gradient and the op sets materialize_grads=False: autograd issues no
    (B, H, Mq) zero fill for it in the backward (one launch per attention layer on a GPU)."""
    q, k, v = _bmhk_inputs()
    out, _ = torch.ops.incrementer_fast.xformers_attention_train(q, k, v)
    upstream = torch.ones_like(out)
    with ZeroFills() as fills:
        torch.autograd.grad(out, (q, k, v), upstream)
    assert split_api.calls["backward"] == 1
    assert not fills.ops, f"the backward filled zero gradients: {fills.ops}"


def test_xformers_ops_opcheck(split_api):
    q, k, v = _bmhk_inputs(shape=(2, 5, 2, 8))
    torch.library.opcheck(torch.ops.incrementer_fast.xformers_attention_train.default, (q, k, v))
    torch.library.opcheck(torch.ops.incrementer_fast.xformers_attention.default, tuple(t.detach() for t in (q, k, v)))
    out, lse = torch.ops.incrementer_fast.xformers_attention_train(q, k, v)
    grad = torch.ones(()).expand(out.shape)  # a stride-0 upstream gradient, as from out.sum()
    saved = tuple(t.detach() for t in (q, k, v, out, lse))
    torch.library.opcheck(torch.ops.incrementer_fast.xformers_attention_backward.default, (grad, *saved))


def test_xformers_fake_shapes_on_cuda_without_a_gpu():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 1025, 12, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.empty(2, 1025, 12, 32, device="cuda", dtype=torch.bfloat16)
        out, lse = torch.ops.incrementer_fast.xformers_attention_train(q, q, v)
        assert out.shape == (2, 1025, 12, 32) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
        assert lse.shape == (2, 12, 1025) and lse.dtype == torch.float32
        assert torch.ops.incrementer_fast.xformers_attention(q, q, v).shape == (2, 1025, 12, 32)
        grads = torch.ops.incrementer_fast.xformers_attention_backward(out, q, q, v, out, lse)
        assert [g.shape for g in grads] == [q.shape, q.shape, v.shape]


def test_xformers_dispatch_and_fullgraph_compile(split_api, monkeypatch):
    """attention(): the training op when an input requires grad and grad mode is on, the inference op
    otherwise; the training path compiles with fullgraph=True, one xformers forward per step."""
    monkeypatch.setattr(attention_module, "resolve_backend", lambda device, dtype, backend=None: "xformers")
    q, k, v = (t.detach().transpose(1, 2).requires_grad_() for t in _bmhk_inputs())  # (B, heads, M, Dh)
    with torch.no_grad():
        attention(q, k, v)
    attention(q.detach(), k.detach(), v.detach())
    assert split_api.calls == Counter(memory_efficient_attention=2)

    def step(q, k, v):
        return attention(q, k, v).square().sum()

    split_api.calls.clear()
    eager = torch.autograd.grad(step(q, k, v), (q, k, v))
    assert split_api.calls == Counter(forward_requires_grad=1, backward=1)
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled = torch.autograd.grad(compiled_step(q, k, v), (q, k, v))
    split_api.calls.clear()
    compiled = torch.autograd.grad(compiled_step(q, k, v), (q, k, v))
    assert split_api.calls == Counter(forward_requires_grad=1, backward=1)
    for name, a, b in zip(("dq", "dk", "dv"), compiled, eager):
        assert_close_rel(a, b, torch.float32, name)
