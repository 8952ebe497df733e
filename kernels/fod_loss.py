"""Triton kernels of the FOD distillation loss: a weighted mean of (1 − cosine) over paired vectors.

Reference: `incrementer_fast.reference.fod_loss` (the spec these kernels are tested against).

Forward
-------
student s and teacher t have one shape (..., D); they are read as M = prod(...) rows of length D, with one
weight w_i per row. With a_i = max(‖s_i‖, eps), b_i = max(‖t_i‖, eps) (eps clamps the norm, so
ŝ_i = s_i / a_i, t̂_i = t_i / b_i),

    cos_i = ⟨ŝ_i, t̂_i⟩ = (⟨s_i, t_i⟩ / a_i) / b_i,      W = Σ_i w_i,
    loss  = Σ_i w_i (1 − cos_i) / W,   and exactly 0 when W = 0.

One pass over the rows gives the three row sums Σ s², Σ t², Σ s·t, so each input element is read once and
no normalised copy is ever written. The two divisions are done one after the other (never a_i · b_i)
so that a zero row with a tiny eps cannot underflow the denominator to 0 and produce 0/0. A fixed grid of
at most MAX_PARTIALS programs strides over blocks of BLOCK_M rows and writes its partial Σ w(1 − cos) and
Σ w to a (2, P) buffer; a second one-program kernel adds the P partials in a fixed order and writes the
loss and W. No atomics: the reduction order depends only on (M, D), so runs are bitwise reproducible.

Backward (VJP)
--------------
Let g be the upstream gradient of the 0-dim loss and c_i = g · w_i / W (c_i = 0 for all i when W = 0, chosen
on the device with `where`, no host sync). Only cos_i depends on s_i, and

    ∂ŝ/∂s = (I − ŝ ŝᵀ) / a    when ‖s‖ ≥ eps  (ŝ = s / ‖s‖),
    ∂ŝ/∂s = I / eps           when ‖s‖ < eps  (ŝ = s / eps: the norm is clamped and has no gradient),

so, with [·] the indicator of the first branch (the reference's clamp_min passes the gradient at ‖s‖ = eps),

    ∂loss/∂s_i = −c_i · (t̂_i − [‖s_i‖ ≥ eps] · cos_i · ŝ_i) / a_i
               = −c_i / (a_i b_i) · t_i  +  [‖s_i‖ ≥ eps] · c_i cos_i / a_i² · s_i,
    ∂loss/∂t_i = −c_i / (a_i b_i) · s_i  +  [‖t_i‖ ≥ eps] · c_i cos_i / b_i² · t_i      (symmetric).

The weight gets no gradient. The backward recomputes the row sums from s and t (cheap: the rows are loaded
anyway to form the gradients) and needs only W from the forward. When a row fits in one tile (D ≤
MAX_BLOCK_D) it stays in registers, so s and t are read once and ds, dt written once; longer rows take a
second pass over the row.

Layout
------
The leading dims (...) of student, teacher and weight are merged jointly where their strides allow it, down
to at most two row dims (outer, inner) with one stride each per tensor, plus a column stride for
student/teacher. That covers contiguous tensors, transposed views (N, B, D) → (B, N, D), transposed
feature dims, and the FOD term on old classes `class_emb[:, :K_old]` (a non-contiguous slice of (B, K, D))
without any copy. A layout needing three or more row dims (e.g. a 3-leading-dim permutation) is copied to
contiguous memory first (one extra read and write of that input). Gradients are returned contiguous.

Precision: fp16/bf16/fp32 inputs accumulate in fp32, fp64 inputs in fp64 (so gradcheck works); the loss
is 0-dim fp32 (fp64 for fp64 student); gradients come back in the student's / teacher's dtype. As in the
reference, gradients of rows with ‖x‖ < eps scale as 1/eps and overflow fp16 for eps below ~1e-4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from incrementer_fast.reference.core import compute_dtype

from . import device_guard

# Elements of one (BLOCK_M × BLOCK_D) tile per tensor: 4096 fp32 values over 8 warps is 16 registers per
# thread per tensor, enough bytes in flight per SM to saturate HBM without spilling in the backward.
TILE_ELEMENTS = 4096
# Longest row kept whole in registers (ViT-B/L features are 768/1024); longer rows are looped over.
MAX_BLOCK_D = 4096
# The forward grid is capped so the partial sums fit one finalize tile: 1024 programs are ~8 per H100 SM.
MAX_PARTIALS = 1024


@triton.jit
def _row_offsets(rows, inner_size, stride_outer, stride_inner):
    """Element offsets (int64) of the starts of `rows` in a tensor whose rows are (outer, inner) strided."""
    return (rows // inner_size) * stride_outer + (rows % inner_size) * stride_inner


@triton.jit
def _fod_loss_fwd_kernel(
    student_ptr,  # (M, D) student rows, strides (s_stride_outer, s_stride_inner) over rows, s_stride_col
    teacher_ptr,  # (M, D) teacher rows, same row decomposition, its own strides
    weight_ptr,  # (M,) one weight per row, strides (w_stride_outer, w_stride_inner)
    partial_ptr,  # (2, P) out: per-program Σ w(1 − cos) in row 0, Σ w in row 1; compute dtype (fp32/fp64)
    M,  # number of rows
    D,  # row length
    inner_size,  # rows are indexed as (row // inner_size, row % inner_size)
    s_stride_outer, s_stride_inner, s_stride_col,
    t_stride_outer, t_stride_inner, t_stride_col,
    w_stride_outer, w_stride_inner,
    EPS: tl.constexpr,  # norm clamp; constexpr so that fp64 runs use eps exactly (a float arg is fp32)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_D: tl.constexpr,  # columns per tile (power of two)
):
    acc_dtype = partial_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    eps = tl.full([BLOCK_M], EPS, acc_dtype)
    row_range = tl.arange(0, BLOCK_M).to(tl.int64)
    col_range = tl.arange(0, BLOCK_D).to(tl.int64)
    numerator = tl.zeros([BLOCK_M], acc_dtype)
    denominator = tl.zeros([BLOCK_M], acc_dtype)
    for block in range(pid, num_row_blocks, num_programs):
        # block * BLOCK_M < M cannot overflow: the loop index takes M's type, int64 once M ≥ 2^31.
        rows = block * BLOCK_M + row_range
        row_mask = rows < M
        s_rows = _row_offsets(rows, inner_size, s_stride_outer, s_stride_inner)
        t_rows = _row_offsets(rows, inner_size, t_stride_outer, t_stride_inner)
        ss = tl.zeros([BLOCK_M], acc_dtype)
        tt = tl.zeros([BLOCK_M], acc_dtype)
        st = tl.zeros([BLOCK_M], acc_dtype)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + col_range
            mask = row_mask[:, None] & (cols < D)[None, :]
            s = tl.load(student_ptr + s_rows[:, None] + cols[None, :] * s_stride_col, mask=mask, other=0.0)
            t = tl.load(teacher_ptr + t_rows[:, None] + cols[None, :] * t_stride_col, mask=mask, other=0.0)
            s = s.to(acc_dtype)
            t = t.to(acc_dtype)
            ss += tl.sum(s * s, axis=1)
            tt += tl.sum(t * t, axis=1)
            st += tl.sum(s * t, axis=1)
        cos = st / tl.maximum(tl.sqrt(ss), eps) / tl.maximum(tl.sqrt(tt), eps)
        w_offsets = _row_offsets(rows, inner_size, w_stride_outer, w_stride_inner)
        w = tl.load(weight_ptr + w_offsets, mask=row_mask, other=0.0).to(acc_dtype)
        numerator += w * (1.0 - cos)  # masked rows have w = 0 and add nothing
        denominator += w
    # pid < P by construction of the grid, so these two scalar stores are in bounds.
    tl.store(partial_ptr + pid, tl.sum(numerator, axis=0))
    tl.store(partial_ptr + num_programs + pid, tl.sum(denominator, axis=0))


@triton.jit
def _fod_loss_finalize_kernel(
    partial_ptr,  # (2, P) per-program Σ w(1 − cos) and Σ w from the forward kernel
    loss_ptr,  # () out: the loss, compute dtype
    weight_sum_ptr,  # () out: W = Σ w, compute dtype (kept for the backward)
    P,  # number of partials
    BLOCK_P: tl.constexpr,  # power of two ≥ P (P ≤ MAX_PARTIALS, so one tile, fixed summation order)
):
    offsets = tl.arange(0, BLOCK_P)
    mask = offsets < P
    numerator = tl.sum(tl.load(partial_ptr + offsets, mask=mask, other=0.0), axis=0)
    weight_sum = tl.sum(tl.load(partial_ptr + P + offsets, mask=mask, other=0.0), axis=0)
    nonzero = weight_sum != 0
    loss = tl.where(nonzero, numerator / tl.where(nonzero, weight_sum, 1.0), 0.0)
    tl.store(loss_ptr, loss)
    tl.store(weight_sum_ptr, weight_sum)


@triton.jit
def _fod_loss_bwd_kernel(
    grad_loss_ptr,  # () upstream gradient of the loss (any layout: only element 0 is read)
    weight_sum_ptr,  # () W from the forward, compute dtype
    student_ptr,  # (M, D) student rows, strided as in the forward kernel
    teacher_ptr,  # (M, D) teacher rows
    weight_ptr,  # (M,) weights
    grad_student_ptr,  # (M, D) out, contiguous, student dtype (unused unless STUDENT_GRAD)
    grad_teacher_ptr,  # (M, D) out, contiguous, teacher dtype (unused unless TEACHER_GRAD)
    M, D, inner_size,
    s_stride_outer, s_stride_inner, s_stride_col,
    t_stride_outer, t_stride_inner, t_stride_col,
    w_stride_outer, w_stride_inner,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_TILE: tl.constexpr,  # D ≤ BLOCK_D: the rows stay in registers between the sums and the gradients
    STUDENT_GRAD: tl.constexpr,  # write ∂loss/∂student
    TEACHER_GRAD: tl.constexpr,  # write ∂loss/∂teacher
):
    acc_dtype = weight_sum_ptr.dtype.element_ty
    weight_sum = tl.load(weight_sum_ptr)
    grad_loss = tl.load(grad_loss_ptr).to(acc_dtype)
    nonzero = weight_sum != 0
    scale = tl.where(nonzero, grad_loss / tl.where(nonzero, weight_sum, 1.0), 0.0)  # g / W, or 0

    eps = tl.full([BLOCK_M], EPS, acc_dtype)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < M
    col_range = tl.arange(0, BLOCK_D).to(tl.int64)
    s_rows = _row_offsets(rows, inner_size, s_stride_outer, s_stride_inner)
    t_rows = _row_offsets(rows, inner_size, t_stride_outer, t_stride_inner)
    out_rows = rows * D  # gradients are contiguous (M, D)
    w = tl.load(weight_ptr + _row_offsets(rows, inner_size, w_stride_outer, w_stride_inner), mask=row_mask, other=0.0)
    c = scale * w.to(acc_dtype)

    if ONE_TILE:  # the whole row in one tile, kept in registers for the gradients below
        mask = row_mask[:, None] & (col_range < D)[None, :]
        s = tl.load(student_ptr + s_rows[:, None] + col_range[None, :] * s_stride_col, mask=mask, other=0.0)
        t = tl.load(teacher_ptr + t_rows[:, None] + col_range[None, :] * t_stride_col, mask=mask, other=0.0)
        s = s.to(acc_dtype)
        t = t.to(acc_dtype)
        ss = tl.sum(s * s, axis=1)
        tt = tl.sum(t * t, axis=1)
        st = tl.sum(s * t, axis=1)
    else:  # first pass over the row: the sums only
        ss = tl.zeros([BLOCK_M], acc_dtype)
        tt = tl.zeros([BLOCK_M], acc_dtype)
        st = tl.zeros([BLOCK_M], acc_dtype)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + col_range
            mask = row_mask[:, None] & (cols < D)[None, :]
            s = tl.load(student_ptr + s_rows[:, None] + cols[None, :] * s_stride_col, mask=mask, other=0.0)
            t = tl.load(teacher_ptr + t_rows[:, None] + cols[None, :] * t_stride_col, mask=mask, other=0.0)
            s = s.to(acc_dtype)
            t = t.to(acc_dtype)
            ss += tl.sum(s * s, axis=1)
            tt += tl.sum(t * t, axis=1)
            st += tl.sum(s * t, axis=1)
    norm_s = tl.sqrt(ss)
    norm_t = tl.sqrt(tt)
    a = tl.maximum(norm_s, eps)
    b = tl.maximum(norm_t, eps)
    cos = st / a / b
    cross = -c / a / b  # coefficient of t in ds and of s in dt
    self_s = tl.where(norm_s >= eps, c * cos / a / a, 0.0)  # coefficient of s in ds
    self_t = tl.where(norm_t >= eps, c * cos / b / b, 0.0)  # coefficient of t in dt

    if ONE_TILE:
        out_offsets = out_rows[:, None] + col_range[None, :]
        if STUDENT_GRAD:
            ds = cross[:, None] * t + self_s[:, None] * s
            tl.store(grad_student_ptr + out_offsets, ds.to(grad_student_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            dt = cross[:, None] * s + self_t[:, None] * t
            tl.store(grad_teacher_ptr + out_offsets, dt.to(grad_teacher_ptr.dtype.element_ty), mask=mask)
    else:  # second pass over the row: reload and write the gradients
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + col_range
            mask = row_mask[:, None] & (cols < D)[None, :]
            s = tl.load(student_ptr + s_rows[:, None] + cols[None, :] * s_stride_col, mask=mask, other=0.0)
            t = tl.load(teacher_ptr + t_rows[:, None] + cols[None, :] * t_stride_col, mask=mask, other=0.0)
            s = s.to(acc_dtype)
            t = t.to(acc_dtype)
            out_offsets = out_rows[:, None] + cols[None, :]
            if STUDENT_GRAD:
                ds = cross[:, None] * t + self_s[:, None] * s
                tl.store(grad_student_ptr + out_offsets, ds.to(grad_student_ptr.dtype.element_ty), mask=mask)
            if TEACHER_GRAD:
                dt = cross[:, None] * s + self_t[:, None] * t
                tl.store(grad_teacher_ptr + out_offsets, dt.to(grad_teacher_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def row_layout(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor):
    """Describe the rows of student/teacher (..., D) and weight (...) as two strided row dims, copying only
    when that is impossible.

    Returns (student, teacher, weight, inner_size, strides) where strides holds, per tensor, the
    (outer, inner) row strides in elements. Size-1 dims are dropped and adjacent dims merged where all three
    tensors allow it; if more than two row dims remain, all three are made contiguous (a copy of each
    non-contiguous one), after which they merge into one.
    """
    dims = [
        (size, (student.stride(i), teacher.stride(i), weight.stride(i)))
        for i, size in enumerate(weight.shape)
        if size != 1
    ]
    merged: list[tuple[int, tuple[int, int, int]]] = []
    for size, strides in dims:
        if merged and all(prev == cur * size for prev, cur in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * size, strides)
        else:
            merged.append((size, strides))
    if weight.numel() == 0:
        merged = []
    if len(merged) > 2:
        return row_layout(student.contiguous(), teacher.contiguous(), weight.contiguous())
    while len(merged) < 2:
        merged.insert(0, (1, (0, 0, 0)))
    (_, outer), (inner_size, inner) = merged
    strides = tuple((outer[k], inner[k]) for k in range(3))
    return student, teacher, weight, inner_size, strides


def _block_sizes(num_rows: int, dim: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(dim, 1)), MAX_BLOCK_D)
    block_m = max(1, min(TILE_ELEMENTS // block_d, triton.next_power_of_2(max(num_rows, 1))))
    return block_m, block_d


def _num_warps(block_m: int, block_d: int) -> int:
    return 8 if block_m * block_d >= 2048 else 4


def _layout_args(student, teacher, weight):
    student, teacher, weight, inner_size, strides = row_layout(student, teacher, weight)
    (so, si), (to, ti), (wo, wi) = strides
    args = (inner_size, so, si, student.stride(-1), to, ti, teacher.stride(-1), wo, wi)
    return student, teacher, weight, args


def fod_loss_forward(
    student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (loss, W): the 0-dim loss and Σ w, both in the compute dtype (fp32, or fp64 for fp64 student)."""
    acc = compute_dtype(student.dtype)
    dim = student.shape[-1]
    num_rows = weight.numel()
    block_m, block_d = _block_sizes(num_rows, dim)
    num_programs = max(1, min(triton.cdiv(num_rows, block_m), MAX_PARTIALS))
    student, teacher, weight, layout = _layout_args(student, teacher, weight)
    partials = torch.empty((2, num_programs), dtype=acc, device=student.device)
    loss = torch.empty((), dtype=acc, device=student.device)
    weight_sum = torch.empty((), dtype=acc, device=student.device)
    with device_guard(student.device):
        _fod_loss_fwd_kernel[(num_programs,)](
            student, teacher, weight, partials, num_rows, dim, *layout,
            EPS=float(eps), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_num_warps(block_m, block_d),
        )
        _fod_loss_finalize_kernel[(1,)](
            partials, loss, weight_sum, num_programs, BLOCK_P=triton.next_power_of_2(num_programs), num_warps=4
        )
    return loss, weight_sum


def fod_loss_backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    weight_sum: torch.Tensor,
    eps: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (∂loss/∂student, ∂loss/∂teacher), contiguous, in the inputs' dtypes; a gradient that is not
    requested is returned as an empty tensor and not computed."""
    device = student.device
    grad_student = torch.empty(student.shape if student_grad else (0,), dtype=student.dtype, device=device)
    grad_teacher = torch.empty(teacher.shape if teacher_grad else (0,), dtype=teacher.dtype, device=device)
    dim = student.shape[-1]
    num_rows = weight.numel()
    if num_rows * dim == 0 or not (student_grad or teacher_grad):
        return grad_student, grad_teacher
    block_m, block_d = _block_sizes(num_rows, dim)
    student, teacher, weight, layout = _layout_args(student, teacher, weight)
    grid = (triton.cdiv(num_rows, block_m),)
    with device_guard(device):
        _fod_loss_bwd_kernel[grid](
            grad_loss, weight_sum, student, teacher, weight,
            # an unrequested gradient's pointer is never dereferenced (its store is compiled out)
            grad_student if student_grad else grad_teacher,
            grad_teacher if teacher_grad else grad_student,
            num_rows, dim, *layout,
            EPS=float(eps), BLOCK_M=block_m, BLOCK_D=block_d, ONE_TILE=dim <= block_d,
            STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, num_warps=_num_warps(block_m, block_d),
        )
    return grad_student, grad_teacher
