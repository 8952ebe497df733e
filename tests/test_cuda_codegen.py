"""Every Triton kernel compiles for an H100 (sm_90, through ptxas to a cubin) — checked without a GPU.

The interpreter runs the kernels' arithmetic on the CPU but never compiles them, so a kernel can pass every
parity test here and still fail on a GPU (a `tl.dot` tile under 16, a dtype the tensor cores refuse, a
shared-memory overflow). This test closes that gap: it runs each op forward and backward on small CPU tensors
with the kernels chosen and the H100 launch plan (``use_backend("triton", plan="h100")``), records every
kernel launch instead of executing it, and compiles each launch with `triton.compile` for
`GPUTarget("cuda", 90, 32)`: exactly the tiles, class blocks and bands that plan chooses. The H200 plan
launches the same kernels with the same constexprs (checked below), so it compiles the same cubins.

It needs Triton's JIT (not the interpreter), so it is skipped when TRITON_INTERPRET=1.
"""
from __future__ import annotations

import pytest
import torch

import incrementer_fast as inc
from incrementer_fast import _dispatch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature  # noqa: E402

pytestmark = pytest.mark.skipif(_dispatch.INTERPRET, reason="compiles with Triton's JIT; the interpreter replaces it")

H100 = GPUTarget("cuda", 90, 32)
_BACKEND = make_backend(H100)

class _LaunchRecorder:
    """Replaces `kernel[grid](...)` by a record of (kernel, signature, constexprs, compile options, grid)."""

    def __init__(self):
        self.launches: dict[tuple, tuple[JITFunction, dict, dict, dict]] = {}

    def __call__(self, fn, grid, args, kwargs):
        assert isinstance(fn, JITFunction), f"{fn!r}: the kernels are plain @triton.jit functions (no autotuner)"
        values = dict(zip(fn.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        # As the JIT specialises a launch on a GPU: an integer argument equal to 1 becomes a constant, one
        # divisible by 16 (and every 16-byte-aligned pointer) carries tt.divisibility = 16, which changes what
        # the compiler's passes do (a pass of Triton 3.8 failed on the cds_dice forward only with them).
        binder = create_function_from_signature(fn.signature, fn.params, _BACKEND)
        bound, specialization, parsed = binder(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(_BACKEND, dict(kwargs), bound, specialization, parsed)
        key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)),
               tuple(sorted((k, str(v)) for k, v in attrs.items())), tuple(sorted(options.items())), tuple(grid))
        self.launches[key] = (fn, signature, constexprs, attrs, options)


def _record(monkeypatch, op, dtype, plan) -> _LaunchRecorder:
    """The launches of ``op`` on CPU tensors under ``plan``, recorded instead of run."""
    recorder = _LaunchRecorder()

    def getitem(kernel, grid):
        return lambda *args, **kwargs: recorder(kernel, grid, args, kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(KernelInterface, "__getitem__", getitem)
        # The one switch that lets the kernel path take CPU tensors without the interpreter: nothing runs.
        patch.setattr(_dispatch, "INTERPRET", True)
        with inc.use_backend("triton", plan=plan):
            OPS[op](dtype)
    return recorder


def _run_cosine_mask(dtype):
    patches = torch.randn(2, 37, 48, dtype=dtype, requires_grad=True)
    classes = torch.randn(2, 5, 48, dtype=dtype, requires_grad=True)
    scale = torch.tensor(3.0, dtype=dtype, requires_grad=True)
    inc.cosine_mask(patches, classes, scale).sum().backward()


def _run_fod_loss(dtype):
    student = torch.randn(2, 37, 48, dtype=dtype, requires_grad=True)
    teacher = torch.randn(2, 37, 48, dtype=dtype, requires_grad=True)
    inc.fod_loss(student, teacher, torch.rand(2, 37, dtype=dtype)).backward()


def _run_cds_dice_loss(dtype):
    logits = torch.randn(2, 7, 9, 11, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 7, (2, 9, 11))
    inc.cds_dice_loss(logits, labels, num_old=3).backward()
    # sizes divisible by 16 (as at 512² with batch 8): the specialisation the odd shape above never gets
    logits = torch.randn(8, 7, 256, 256, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 7, (8, 256, 256))
    inc.cds_dice_loss(logits, labels, num_old=3).backward()


def _run_seg_head(dtype):
    masks = torch.randn(2, 7, 4, 5, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 7, (2, 13, 17))
    ce, dice = inc.seg_head_loss(masks, labels, num_old=3, new_class_weight=2.0)
    (ce + dice).backward()
    teacher = torch.randn(2, 3, 4, 5, dtype=dtype)
    old_labels = torch.randint(0, 3, (2, 13, 17))
    for entropy in ("plop", "normalized"):
        inc.entropy_histogram(teacher, old_labels, num_bins=100, num_classes=7, entropy=entropy)
        inc.pseudo_label(teacher, old_labels, torch.full((3,), 0.5), num_classes=7, entropy=entropy)


OPS = {
    "cosine_mask": _run_cosine_mask,
    "fod_loss": _run_fod_loss,
    "cds_dice_loss": _run_cds_dice_loss,
    "seg_head": _run_seg_head,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", sorted(OPS))
def test_kernels_compile_for_h100(op, dtype, monkeypatch):
    recorded = _record(monkeypatch, op, dtype, "h100")
    assert recorded.launches, f"{op} launched no Triton kernel with the Triton backend chosen"
    for fn, signature, constexprs, attrs, options in recorded.launches.values():
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=H100, options=options)
        assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0, fn.__name__


@pytest.mark.parametrize("op", sorted(OPS))
def test_h200_plan_launches_what_h100_does(op, monkeypatch):
    """Same kernels, constexprs, options and grids: the H100 cubins above are the H200's."""
    h100 = _record(monkeypatch, op, torch.float32, "h100").launches.keys()
    assert set(_record(monkeypatch, op, torch.float32, "h200").launches.keys()) == set(h100)

