"""incrementer_fast.attention: backend choice, SDPA parity with timm's attention, forced-backend errors,
and (with a GPU and xformers) the xformers custom op against SDPA, eager and compiled."""
import pytest
import torch
from helpers import assert_close_rel
from timm.layers import Attention as TimmAttention

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
    # "auto" decides from the device type and dtype only, so the CUDA rule is checked without a GPU:
    # float32 stays on SDPA; half precision takes xformers when it is installed.
    assert resolve_backend(torch.device("cuda"), torch.float32) == "sdpa"
    expected_half = "xformers" if XFORMERS_INSTALLED else "sdpa"
    assert resolve_backend(torch.device("cuda"), torch.bfloat16) == expected_half
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
    torch.library.opcheck(torch.ops.incrementer_fast.xformers_attention.default, (q, k, v))

    def step(q, k, v):
        return attention(q, k, v, backend="xformers").square().sum()

    eager = torch.autograd.grad(step(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True)(q, k, v), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), compiled, eager):
        assert_close_rel(a, b, torch.bfloat16, name)
