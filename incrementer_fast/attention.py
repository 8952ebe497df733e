"""Multi-head attention for the Incrementer model, routed per call to xformers or PyTorch's SDPA.

Backends
--------
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` — CUDA only (xformers ships no CPU
  operator). It takes (B, M, heads, Dh) while SDPA takes (B, heads, M, Dh): :func:`attention` keeps the
  SDPA layout at its interface and transposes views (no copy; xformers only needs the last stride to be 1).
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, on any device.
* ``"auto"``: SDPA, on every device and dtype, until a GPU measurement shows xformers at least as fast
  for training (forward + backward) somewhere; the rule will then name those cases (the GPU check,
  ``benchmarks/gpu_check.sh``, times both at the model's shapes and prints the ratio). Why SDPA until
  then: xformers 0.0.35's attention operators for a Hopper GPU without the separate ``flash_attn_3``
  package are PyTorch's own kernels (``aten._flash_attention_forward`` and
  ``aten._efficient_attention_forward``), the ones SDPA itself dispatches to, reached through xformers'
  Python dispatch and a custom op; there is no reason to expect them faster, and one measurement will
  tell. (Earlier versions of this library took xformers for CUDA float16/bfloat16 tensors.)

The choice is made per call: the ``backend`` argument when given (the model passes its ``attention=``
option), else the environment variable ``INCREMENTER_ATTENTION`` (``auto|xformers|sdpa``), else
``"auto"``. Under ``torch.compile`` the variable is read while tracing, so set it before the first
compiled call. A forced choice that cannot run (xformers on CPU, or not installed) raises
:class:`RuntimeError`; it never falls back silently.

torch.compile
-------------
SDPA traces natively. Dynamo breaks on ``memory_efficient_attention`` (its operator dispatch is Python
code with device queries: facebookresearch/xformers#765, #1107), so the xformers calls are custom ops with
fake implementations:

* ``incrementer_fast::xformers_attention`` — inference (no input requires grad):
  ``memory_efficient_attention``, which skips the log-sum-exp.
* ``incrementer_fast::xformers_attention_train`` — training: xformers' split API,
  ``memory_efficient_attention_forward_requires_grad`` → (output, log-sum-exp), both saved for the
  backward, ``incrementer_fast::xformers_attention_backward``, which calls
  ``memory_efficient_attention_backward(grad, output, lse, q, k, v)``: no attention forward is recomputed.
  The log-sum-exp xformers returns is (B, H, Mq) from its flash operator but padded to a multiple of 32
  along Mq from its cutlass one; the op returns it cut to (B, H, Mq), a shape the fake implementation can
  state without knowing which operator xformers dispatches to, and which every xformers backward operator
  accepts (cutlass pads it again itself, ``Context.get_padded_lse``). Both operators store the natural-log
  log-sum-exp of the scaled scores, so xformers may pick different forward and backward operators, as its
  own autograd does.

These paths run only on a GPU with xformers; tests/test_attention.py checks their wiring on the CPU with a
plain-PyTorch stand-in for xformers' split API (registration, fake, opcheck, no recomputation, a
fullgraph compile) and the real thing against SDPA on CUDA.

Attention dropout (``dropout_p > 0``) on xformers uses ``memory_efficient_attention``'s own autograd
(the dropout mask lives in xformers' RNG state, which the non-autograd API does not expose): correct in
eager mode, but a graph break under torch.compile. The Incrementer model's default attention dropout is
0 for that reason (see incrementer_fast/model.py).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention

ENV_VAR = "INCREMENTER_ATTENTION"
BACKENDS = ("auto", "xformers", "sdpa")
XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # accepted when forced

# Whether xformers can be imported, decided once without importing it (importing it is slow and pulls in
# its CUDA extensions); the import itself happens in the custom op's implementation, on first CUDA use.
XFORMERS_INSTALLED = importlib.util.find_spec("xformers") is not None


def _check_backend_name(backend: str, source: str) -> str:
    name = backend.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return name


def requested_backend(backend: Optional[str] = None) -> str:
    """The requested backend name: ``backend`` if given, else ``$INCREMENTER_ATTENTION``, else ``"auto"``."""
    if backend is not None:
        return _check_backend_name(backend, "attention backend")
    return _check_backend_name(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


def resolve_backend(device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> str:
    """``"xformers"`` or ``"sdpa"``: the backend that runs attention on tensors of ``device`` and ``dtype``.

    Raises RuntimeError when xformers is forced but cannot run there.
    """
    requested = requested_backend(backend)
    device = torch.device(device)
    if requested in ("sdpa", "auto"):  # auto: SDPA until measured otherwise (see the module docstring)
        return "sdpa"
    if device.type != "cuda":
        raise RuntimeError(
            f"attention backend 'xformers' was forced (argument or {ENV_VAR}) but the tensors are on "
            f"{device}: xformers' memory_efficient_attention has no CPU operator. Use 'sdpa' or 'auto'."
        )
    if not XFORMERS_INSTALLED:
        raise RuntimeError(
            f"attention backend 'xformers' was forced (argument or {ENV_VAR}) but xformers is not "
            "installed: `pip install xformers`, or use 'sdpa' or 'auto'."
        )
    if dtype not in XFORMERS_DTYPES:
        raise RuntimeError(f"attention backend 'xformers' supports float16, bfloat16 and float32, got {dtype}")
    return "xformers"


def _import_xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError as error:  # installed (find_spec saw it) but broken, e.g. built for another torch
        raise RuntimeError(f"xformers is installed but cannot be imported: {error}") from error
    return xops


@torch.library.custom_op("incrementer_fast::xformers_attention", mutates_args=())
def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh)·v for q (B, Mq, H, Dh), k (B, Mk, H, Dh), v (B, Mk, H, Dv) → (B, Mq, H, Dv).

    Inference only (registered without autograd): the training path is ``_xformers_attention_train``.
    Outputs of these ops are contiguous, as their fake implementations state (a no-op copy for xformers'
    own outputs, which are; a guarantee for compiled graphs, which trust the fake's strides).
    """
    return _import_xformers_ops().memory_efficient_attention(q, k, v).contiguous()


@_xformers_attention.register_fake
def _(q, k, v):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("incrementer_fast::xformers_attention_train", mutates_args=())
def _xformers_attention_train(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, Mq, H, Dv), log-sum-exp (B, H, Mq) float32) for the backward (see the module docstring)."""
    out, lse = _import_xformers_ops().memory_efficient_attention_forward_requires_grad(q, k, v)
    return out.contiguous(), lse[..., : q.shape[1]].contiguous()


@_xformers_attention_train.register_fake
def _(q, k, v):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("incrementer_fast::xformers_attention_backward", mutates_args=())
def _xformers_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the saved output and log-sum-exp: no attention forward is recomputed."""
    # contiguous(): the upstream gradient may be a stride-0 expansion (the gradient of a .sum()), and
    # xformers needs a unit last stride; a no-op in the usual case.
    grads = _import_xformers_ops().memory_efficient_attention_backward(grad_out.contiguous(), out, lse, q, k, v)
    return tuple(grad.contiguous() for grad in grads)


@_xformers_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse):
    contiguous = torch.contiguous_format
    return tuple(torch.empty_like(t, memory_format=contiguous) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # the lse never gets a gradient: no (B, H, Mq) zero fill for it
    ctx.save_for_backward(*inputs, out, lse)


def _backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        return None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    return torch.ops.incrementer_fast.xformers_attention_backward(grad_out, q, k, v, out, lse)


_xformers_attention_train.register_autograd(_backward, setup_context=_setup_context)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, heads, M, Dh), got shape {tuple(t.shape)}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(f"q, k and v must agree in B and heads (layout (B, heads, M, Dh)); got {shapes}")
    if q.shape[-1] != k.shape[-1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"q and k must agree in Dh and k and v in M; got {shapes}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: Optional[str] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh)·v with q (B, heads, Mq, Dh), k (B, heads, Mk, Dh), v (B, heads, Mk, Dv).

    Returns (B, heads, Mq, Dv). ``backend``: ``"auto" | "xformers" | "sdpa"`` or None for
    ``$INCREMENTER_ATTENTION`` (default ``"auto"``); see the module docstring. ``dropout_p`` drops attention
    probabilities (pass 0 in eval mode).
    """
    _check_qkv(q, k, v)
    if resolve_backend(q.device, q.dtype, backend) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if dropout_p > 0.0:
        out = _import_xformers_ops().memory_efficient_attention(q, k, v, p=dropout_p)
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, _ = torch.ops.incrementer_fast.xformers_attention_train(q, k, v)
    else:
        out = torch.ops.incrementer_fast.xformers_attention(q, k, v)
    return out.transpose(1, 2)


class Attention(TimmAttention):
    """timm's ``Attention`` (same constructor, parameters and state-dict keys) computing through
    :func:`attention`.

    Passed to timm's ViT as ``attn_layer=`` and used by the decoder's blocks. ``backend`` (None: the
    environment variable, then auto) is set per module by the model's ``attention=`` option.
    """

    backend: Optional[str] = None

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "incrementer_fast.attention.Attention attends over all tokens; attn_mask and is_causal "
                "are not supported"
            )
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = attention(q, k, v, backend=self.backend, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        norm = getattr(self, "norm", None)  # timm < 1.0.20 has no scale_norm
        if norm is not None:
            x = norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


__all__ = ["ENV_VAR", "BACKENDS", "Attention", "attention", "requested_backend", "resolve_backend"]
