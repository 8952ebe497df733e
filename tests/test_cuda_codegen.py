"""Every Triton kernel compiles for an H100 (sm_90, through ptxas to a cubin) — checked without a GPU.

The interpreter runs the kernels' arithmetic on the CPU but never compiles them, so a kernel can pass every
parity test here and still fail on a GPU (a `tl.dot` tile under 16, a dtype the tensor cores refuse, a
shared-memory overflow in one autotune config). This test closes that gap: it runs each op forward and
backward on small CPU tensors with the dispatch forced to "triton", records every kernel launch instead of
executing it, and compiles each launch with `triton.compile` for `GPUTarget("cuda", 90, 32)` — once per
CUDA autotune config, since on a GPU the autotuner compiles them all.

It needs Triton's JIT (not the interpreter), so it is skipped when TRITON_INTERPRET=1.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import incrementer_fast as inc
from incrementer_fast._dispatch import INTERPRET
from incrementer_fast.kernels import utils as kernel_utils

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction, KernelInterface  # noqa: E402

pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles with Triton's JIT; the interpreter replaces it")

H100 = GPUTarget("cuda", 90, 32)

_POINTER_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.int16: "*i16",
    torch.int8: "*i8",
    torch.uint8: "*u8",
    torch.bool: "*i1",
}


def _arg_type(value) -> str:
    """The signature type Triton's launcher would give this runtime argument."""
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument of type {type(value).__name__}")


class _LaunchRecorder:
    """Replaces `kernel[grid](...)` by a record of (kernel, bound arguments, compile options) per config."""

    def __init__(self):
        self.launches: dict[tuple, tuple[JITFunction, dict, dict, dict]] = {}

    def __call__(self, kernel, args, kwargs):
        configs = [None]
        heuristics = []
        fn = kernel
        while not isinstance(fn, JITFunction):
            if isinstance(fn, Autotuner):
                configs = fn.configs
            elif isinstance(fn, Heuristics):
                heuristics.append(fn.values)
            fn = fn.fn
        bound = dict(zip(fn.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
        launch_options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        for config in configs:
            values = dict(bound)
            options = dict(launch_options)
            if config is not None:
                values.update(config.kwargs)
                options.update(num_warps=config.num_warps, num_stages=config.num_stages)
            for rules in heuristics:
                values.update({name: rule(values) for name, rule in rules.items()})
            constexprs = {p.name: values[p.name] for p in fn.params if p.is_constexpr}
            signature = {p.name: ("constexpr" if p.is_constexpr else _arg_type(values[p.name])) for p in fn.params}
            key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)),
                   tuple(sorted(options.items())))
            self.launches[key] = (fn, signature, constexprs, options)


@pytest.fixture
def recorded_launches(monkeypatch):
    recorder = _LaunchRecorder()

    def getitem(kernel, grid):
        return lambda *args, **kwargs: recorder(kernel, args, kwargs)

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    # Plan the launches for an H100/H200 (the tiles and grids a GPU runs), not for the interpreter's 1 SM.
    monkeypatch.setattr(kernel_utils, "PLAN_SMS", kernel_utils.H100_SMS)
    for name in ("cosine_mask", "fod_loss", "cds_dice_loss", "seg_head"):
        monkeypatch.setattr(importlib.import_module(f"incrementer_fast.ops.{name}"), "backend", lambda device: "triton")
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
def test_kernels_compile_for_h100(op, dtype, recorded_launches):
    OPS[op](dtype)
    assert recorded_launches.launches, f"{op} launched no Triton kernel with the dispatch forced to triton"
    for fn, signature, constexprs, options in recorded_launches.launches.values():
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=H100, options=options)
        assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0, fn.__name__
