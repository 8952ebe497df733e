"""Modelled peak memory of a whole incremental training step, fused ops vs reference ops (issue 10).

The step is ``workloads.TrainingStep``'s: an ``Incrementer`` student after ``add_classes`` and its
``frozen_copy()`` teacher; teacher forward (no grad), student forward, the trainer's own
``compute_losses`` (PLOP pseudo-labels, CE + CDS dice + both FOD terms), backward. It runs on ``meta``
tensors — shapes without data, so ViT-B/16 at 512² with batch 8 costs a second — under
``ledger_count.AtenCounter``, which tracks the live bytes of every storage the step allocates. The peak
is what the step adds on top of the parameters and the batch (those exist before tracking starts).

As on a GPU:
* attention runs as PyTorch's memory-efficient SDPA kernel (``aten._scaled_dot_product_efficient_attention``:
  output and log-sum-exp saved, no (N, N) matrix), which is what CUDA's SDPA dispatch picks for these
  shapes; on ``meta`` the dispatcher would otherwise take the math path and materialise every attention
  matrix. The ledger substitutes it with a ``TorchFunctionMode`` around the step (the model is not changed);
* the fused ops run their fake (meta) implementations, which allocate their outputs and the tensors they
  save for the backward; their transient internals (per-tile partial sums, a few MB at these shapes) are
  not in the figure.

Only float32 is modelled: autocast has no meta backend, so the bf16 step (autocast on CUDA) cannot be
replayed this way. Not a measurement: the caching allocator's rounding and fragmentation, cuBLAS
workspaces and the CUDA context are not counted.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import workloads as W
from ledger_count import AtenCounter


class MemoryEfficientAttention(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` (no mask, no dropout) to the memory-efficient kernel."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            extra = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:]), **kwargs)
            if extra.get("attn_mask") is None and not extra.get("dropout_p") and not extra.get("is_causal"):
                out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True,
                                                                             scale=extra.get("scale"))
                return out[0]
        return func(*args, **kwargs)


def _build(case: W.StepCase):
    from incrementer_fast.model import Incrementer

    with torch.device("meta"):
        model = Incrementer(case.backbone, case.num_old, img_size=case.image_size)
        teacher = model.frozen_copy()
        model.add_classes(case.num_new)
        model.train()
        size = (case.batch, case.image_size, case.image_size)
        images = torch.randn((case.batch, 3, case.image_size, case.image_size))
        labels = torch.randint(0, case.num_old + case.num_new, size)
        thresholds = torch.full((case.num_old,), 0.5)
    return model, teacher, images, labels, thresholds


def run_step(case: W.StepCase, fused: bool) -> dict:
    """Live-byte peaks of one step (fp32) with the fused ops or the reference ops everywhere."""
    from incrementer_fast.continual.config import TrainConfig
    from incrementer_fast.continual.train import compute_losses

    model, teacher, images, labels, thresholds = _build(case)
    config = TrainConfig(fused_head=fused)
    context = contextlib.nullcontext() if fused else W.reference_ops()
    with context, MemoryEfficientAttention(), AtenCounter() as aten:
        with torch.no_grad():
            teacher_out = teacher(images)
        student_out = model(images)
        forward_peak = aten.live.peak
        base = aten.live.reset_peak()
        terms = compute_losses(config, student_out, labels, num_old=case.num_old, patch_size=model.patch_size,
                               teacher=teacher_out, thresholds=thresholds)
        loss_peak = aten.live.peak - base
        terms.total.backward()
        peak = max(forward_peak, aten.live.peak)
    return {"title": "fused ops" if fused else "reference ops", "dtype": "fp32", "peak_bytes": peak,
            "forward_peak_bytes": forward_peak, "loss_peak_bytes": loss_peak, "ops": len(aten.launches)}


def step_memory(size: str) -> dict:
    case = W.STEP_CASES["paper" if size == "paper" else "tiny"]
    return {
        "title": f"{case.title}: teacher forward + student forward + losses + backward",
        "method": "live tensor bytes tracked on meta tensors (modelled, not measured); memory-efficient SDPA "
                  "as on CUDA; fp32 only (autocast has no meta backend); parameters and the batch excluded",
        "variants": [run_step(case, fused=True), run_step(case, fused=False)],
    }
