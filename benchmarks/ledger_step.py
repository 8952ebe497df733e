"""Modelled peak memory of a whole incremental training step, fused ops vs reference ops.

The step is ``workloads.TrainingStep``'s: an ``Incrementer`` student after ``add_classes`` and its
``frozen_copy()`` teacher; teacher forward (no grad), student forward, the trainer's own
``compute_losses`` (PLOP pseudo-labels, CE + CDS dice + both FOD terms), backward. It runs on fake CPU
tensors (``FakeTensorMode``: shapes without data, so ViT-B/16 at 512² with batch 8 costs seconds) under
``ledger_count.AtenCounter``, which tracks the live bytes of every storage the step allocates. The peak
is what the step adds on top of the parameters and the batch (those exist before tracking starts).
``bf16`` runs the networks under autocast as the trainer does on CUDA (CPU autocast's op lists stand in
for CUDA's: both run the linear layers and matrix products in bf16).

As on a GPU:
* attention runs as PyTorch's memory-efficient SDPA kernel (``aten._scaled_dot_product_efficient_attention``:
  output and log-sum-exp saved, no (N, N) matrix), which is what CUDA's SDPA dispatch picks for these
  shapes (and xformers' kernels keep the same for bf16); off CUDA the dispatcher would take the math path
  and materialise every attention matrix. The ledger substitutes it with a ``TorchFunctionMode`` around the step (the model is not changed);
* the fused ops run their fake implementations, which allocate their outputs and the tensors they save for
  the backward; their transient internals (per-tile partial sums, a few MB at these shapes) are not in the
  figure.

Not a measurement: the caching allocator's rounding and fragmentation, cuBLAS
workspaces and the CUDA context are not counted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

import incrementer_fast as inc
import ledger_model
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
    """Student, teacher and one batch as fake CPU tensors (call inside ``FakeTensorMode``).

    The networks are built on ``meta`` (timm's constructor reads Python numbers out of tensors, which fake
    tensors cannot give), then given fake CPU storage with ``to_empty``.
    """
    from incrementer_fast.model import Incrementer

    with torch.device("meta"), _unfaked():
        model = Incrementer(case.backbone, case.num_old, img_size=case.image_size)
        teacher = model.frozen_copy()
        model.add_classes(case.num_new)
    model = model.to_empty(device="cpu").train()
    teacher = teacher.to_empty(device="cpu")
    size = (case.batch, case.image_size, case.image_size)
    images = torch.randn((case.batch, 3, case.image_size, case.image_size))
    labels = torch.randint(0, case.num_old + case.num_new, size)
    thresholds = torch.full((case.num_old,), 0.5)
    return model, teacher, images, labels, thresholds


def _unfaked():
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def run_step(case: W.StepCase, fused: bool, dtype: str) -> dict:
    """Live-byte peaks of one step with the fused ops or the reference ops everywhere (on fake tensors)."""
    from incrementer_fast.continual.config import TrainConfig
    from incrementer_fast.continual.train import compute_losses, make_pseudo_labeler

    with FakeTensorMode(allow_non_fake_inputs=True):  # the meta-built parameters are only shape sources
        return _run_step(case, fused, dtype, TrainConfig(fused_head=fused), compute_losses,
                         make_pseudo_labeler)


def _run_step(case, fused, dtype, config, compute_losses, make_pseudo_labeler) -> dict:
    model, teacher, images, labels, thresholds = _build(case)
    pseudo_labeler = make_pseudo_labeler(config, case.num_old + case.num_new, thresholds)
    context = inc.use_backend("auto" if fused else "reference")  # as workloads.TrainingStep
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with context, MemoryEfficientAttention(), AtenCounter(open_namespaces=(), record_host_ops=True) as aten:
        with torch.no_grad(), autocast:
            teacher_out = teacher(images)
        with autocast:
            student_out = model(images)
        forward_peak = aten.live.peak
        base = aten.live.reset_peak()
        terms = compute_losses(config, student_out, labels, num_old=case.num_old, patch_size=model.patch_size,
                               teacher=teacher_out, pseudo_labeler=pseudo_labeler)
        loss_peak = aten.live.peak - base
        aten.phase = "backward"
        terms.total.backward()
        peak = max(forward_peak, aten.live.peak)
    gpu_ops = [launch for launch in aten.launches if launch.kind != "host"]
    return {"title": "fused ops" if fused else "reference ops", "dtype": dtype, "peak_bytes": peak,
            "forward_peak_bytes": forward_peak, "loss_peak_bytes": loss_peak, "ops": len(gpu_ops),
            # every op in issue order (the fused custom ops as one record each, priced by step_time)
            "timeline": [ledger_model.timeline_entry(launch.to_json()) for launch in aten.launches]}


# A fused op of the step → the ledger op whose paper-size fused row prices it, by the custom op's name.
CUSTOM_OPS = {"cosine_mask": "cosine_mask", "cosine_mask_backward": "cosine_mask",
              "plop_pseudo_label": "pseudo_label", "seg_head_loss_sums": "seg_head_loss",
              "seg_head_loss_sums_backward": "seg_head_loss", "fod_loss": "fod_loss", "fod_loss_backward": "fod_loss",
              "cds_dice_loss": "cds_dice_loss", "cds_dice_loss_backward": "cds_dice_loss",
              "mib_head_loss": "mib_head_loss", "mib_head_loss_backward": "mib_head_loss"}


def step_time(variant: dict, ledger_rows: list[dict], gpu, params: dict | None = None) -> dict:
    """Modelled time of one training step (``run_step``'s timeline) with ``ledger_model.CalibratedModel``.

    The aten ops are priced as they are. Each fused custom op is replaced by the launches of the ledger's
    paper-size fused row of its op (same dtype; forward ops by its forward launches, ``*_backward`` ops by
    its backward launches) when the call reads at least a quarter of the row's input bytes (the call is the
    row's case: the step's shapes are the ledger's paper shapes); a smaller call (FOD on
    the old class embeddings; the teacher's cosine mask with K_old classes is priced as the row's K, an
    upper bound) is priced as one Triton launch moving its own inputs and outputs once. The host is priced as
    an eager call's (no compiled graph). Returns the step's ms, the GPU ms of the fused ops' launches in it
    and how each custom op was priced."""
    rows = {}
    for row in ledger_rows:
        if row["provider"] == "fused" and row["dtype"] == variant["dtype"] and row["mode"] in ("forward+backward",
                                                                                              "forward"):
            key = row["op"]
            if key not in rows or _row_input_bytes(row) > _row_input_bytes(rows[key]):
                rows[key] = row  # the largest case of the op: the paper step's (K = 151 against K = 21)
    timeline, priced, fused_marks = [], [], []
    for launch in variant["timeline"]:
        name = launch.get("name", "")
        op = name.split(".")[1] if name.startswith("incrementer_fast.") else None
        if op is None:
            timeline.append(launch)
            continue
        ledger_op = CUSTOM_OPS.get(op)
        phase = "backward" if op.endswith("_backward") else "forward"
        row = rows.get(ledger_op)
        own_bytes = launch["bytes_read"] + launch["bytes_written"]
        start = len(timeline)
        if row is not None and launch["bytes_read"] >= 0.25 * _row_input_bytes(row):
            timeline.extend(dict(l, phase=launch["phase"]) for l in row["timeline"] if l["phase"] == phase)
            priced.append(f"{op}: ledger row {row['op']} [{row['case']}] {phase}")
        else:
            timeline.append({"kind": "triton", "phase": launch["phase"], "bytes_read": launch["bytes_read"],
                             "bytes_written": launch["bytes_written"], "dot_flops": {}, "lane_ops": {},
                             "transcendental_ops": 0, "grid": 1024, "num_warps": 4})
            priced.append(f"{op}: its own bytes ({own_bytes / 1e6:.1f} MB, one launch)")
        fused_marks.extend(range(start, len(timeline)))
    calibrated = ledger_model.CalibratedModel(params)
    total = calibrated.call_ms(timeline, gpu, "liger")
    marked = set(fused_marks)
    ours = sum(calibrated.gpu_seconds(l, gpu) for i, l in enumerate(timeline)
               if i in marked and l["kind"] not in ("host", "sync")) * 1e3
    return {"ms": total, "fused_ops_gpu_ms": ours, "priced": priced}


def _row_input_bytes(row: dict) -> float:
    """The bytes of the row's inputs (its ``shapes``, at the row's dtype)."""
    element = 2 if row["dtype"] == "bf16" else 4
    total = 0
    for shape in row["shapes"].values():
        n = 1
        for size in shape:
            n *= size
        total += n * element
    return total


def step_memory(size: str) -> dict:
    case = W.STEP_CASES["paper" if size == "paper" else "tiny"]
    return {
        "title": f"{case.title}: teacher forward + student forward + losses + backward",
        "method": "live tensor bytes tracked on fake tensors (modelled, not measured); memory-efficient SDPA "
                  "as on CUDA; bf16 = autocast; parameters and the batch excluded",
        "variants": [run_step(case, fused, dtype) for dtype in ("fp32", "bf16") for fused in (True, False)],
    }
