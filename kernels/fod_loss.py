"""Triton kernels of the FOD distillation loss: a weighted mean of (1 − cosine) over paired vectors.

Reference: `incrementer_fast.reference.fod_loss` (the spec these kernels are tested against).

Forward
-------
student s and teacher t have one shape (..., D); they are read as M = prod(...) rows of length D, with one
weight w_i per row, clamped at 0 (negative weights count as 0, as in the reference: see its docstring).
With a_i = max(‖s_i‖, eps), b_i = max(‖t_i‖, eps) (eps clamps the norm, so ŝ_i = s_i / a_i, t̂_i = t_i / b_i),

    cos_i = ⟨ŝ_i, t̂_i⟩ = (⟨s_i, t_i⟩ / a_i) / b_i,      W = Σ_i w_i,
    loss  = Σ_i w_i (1 − cos_i) / W,   and exactly 0 when W = 0.

One pass over the rows gives the three row sums Σ s², Σ t², Σ s·t, so each input element is read once and
no normalised copy is ever written. The two divisions are done one after the other (never a_i · b_i)
so that a zero row with a tiny eps cannot underflow the denominator to 0 and produce 0/0. One launch: a
fixed grid of at most MAX_PARTIALS programs strides over blocks of BLOCK_M rows and writes its partial
Σ w(1 − cos) and Σ w to a (2, P) buffer; then each program increments a counter (an int32 atomic), and the
program that finds itself last adds the P partials in a fixed order and writes the loss and W ("last
program done", `utils.completion_counter`). No float atomics: the reduction order depends only on (M, D),
so runs are bitwise reproducible, whichever program finishes last.

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
anyway to form the gradients) and needs only W from the forward. A row of up to 4 chunks of BLOCK_D
columns stays in registers (one variable per chunk), so s and t are read once and ds, dt written once;
longer rows take a second pass over the row.

Lanes: BLOCK_D is a power of two, but a row is covered by up to 4 chunks of it, chosen to waste the
fewest lanes (`_row_chunks`): D = 768 is 3 chunks of 256, not one 1024-wide tile with a quarter of its
lanes masked off.

Layout
------
The leading dims (...) of student, teacher and weight are merged jointly where their strides allow it
(`utils.merge_dims`), down to at most two row dims (outer, inner) with one stride each per tensor, plus a
column stride for student/teacher. That covers contiguous tensors, transposed views (N, B, D) → (B, N, D),
transposed feature dims, and the FOD term on old classes `class_emb[:, :K_old]` (a non-contiguous slice of
(B, K, D)) without any copy. A layout needing three or more row dims (e.g. a 3-leading-dim permutation) is
copied to contiguous memory first (one extra read and write of that input). Gradients are returned
contiguous.

Precision: fp16/bf16/fp32 inputs accumulate in fp32, fp64 inputs in fp64 (so gradcheck works); the loss
is 0-dim fp32 (fp64 for fp64 student); gradients come back in the student's / teacher's dtype. As in the
reference, gradients of rows with ‖x‖ < eps scale as 1/eps and overflow fp16 for eps below ~1e-4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import compute_dtype, completion_counter, device_guard, merge_dims, num_warps

# Elements of one (BLOCK_M × D) row tile per tensor: 4096 fp32 values over 8 warps is 16 registers per
# thread per tensor, enough bytes in flight per SM to saturate HBM without spilling in the backward.
TILE_ELEMENTS = 4096
# Widest chunk of a row; a row of up to MAX_CHUNKS chunks stays in registers in the backward.
MAX_BLOCK_D = 4096
MAX_CHUNKS = 4
# The forward grid is capped so the partial sums fit the last program's one tile: 1024 programs are ~8 per SM.
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
    partial_ptr,  # (2, P) scratch: per-program Σ w(1 − cos) in row 0, Σ w in row 1; compute dtype
    counter_ptr,  # (1,) int32, 0 on entry and on exit: programs done
    loss_ptr,  # () out: the loss, compute dtype
    weight_sum_ptr,  # () out: W = Σ w, compute dtype (kept for the backward)
    M,  # number of rows
    D,  # row length
    inner_size,  # rows are indexed as (row // inner_size, row % inner_size)
    s_stride_outer, s_stride_inner, s_stride_col,
    t_stride_outer, t_stride_inner, t_stride_col,
    w_stride_outer, w_stride_inner,
    EPS: tl.constexpr,  # norm clamp; constexpr so that fp64 runs use eps exactly (a float arg is fp32)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_D: tl.constexpr,  # columns per chunk (power of two)
    BLOCK_P: tl.constexpr,  # power of two ≥ P (P ≤ MAX_PARTIALS: the partials are summed as one tile)
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
        w = tl.where(w < 0, 0.0, w)  # max(w, 0) that keeps a NaN (tl.maximum drops it), as the reference does
        numerator += w * (1.0 - cos)  # masked rows have w = 0 and add nothing
        denominator += w
    # pid < P by construction of the grid, so these two scalar stores are in bounds.
    tl.store(partial_ptr + pid, tl.sum(numerator, axis=0))
    tl.store(partial_ptr + num_programs + pid, tl.sum(denominator, axis=0))
    # Last program done: every thread's store above precedes the counter's release (barrier, then an
    # acquire-release atomic at GPU scope), and the last program's acquire precedes its loads, which bypass
    # L1 (.cg) so that they see the other programs' partials.
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if done == num_programs - 1:
        offsets = tl.arange(0, BLOCK_P)
        mask = offsets < num_programs
        total = tl.sum(tl.load(partial_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
        weight_sum = tl.sum(
            tl.load(partial_ptr + num_programs + offsets, mask=mask, other=0.0, cache_modifier=".cg"), axis=0
        )
        nonzero = weight_sum != 0
        tl.store(loss_ptr, tl.where(nonzero, total / tl.where(nonzero, weight_sum, 1.0), 0.0))
        tl.store(weight_sum_ptr, weight_sum)
        tl.store(counter_ptr, 0)  # ready for the next launch on this stream


@triton.jit
def _load_chunk(student_ptr, teacher_ptr, s_rows, t_rows, row_mask, d0, D, s_stride_col, t_stride_col,
                BLOCK_D: tl.constexpr, acc_dtype: tl.constexpr):
    """Columns [d0, d0 + BLOCK_D) of the student and teacher rows, in the accumulation dtype."""
    cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask = row_mask[:, None] & (cols < D)[None, :]
    s = tl.load(student_ptr + s_rows[:, None] + cols[None, :] * s_stride_col, mask=mask, other=0.0)
    t = tl.load(teacher_ptr + t_rows[:, None] + cols[None, :] * t_stride_col, mask=mask, other=0.0)
    return s.to(acc_dtype), t.to(acc_dtype)


@triton.jit
def _store_chunk(grad_student_ptr, grad_teacher_ptr, s, t, cross, self_s, self_t, out_rows, row_mask, d0, D,
                 BLOCK_D: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """ds = cross·t + self_s·s and dt = cross·s + self_t·t for columns [d0, d0 + BLOCK_D) (contiguous rows)."""
    cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    mask = row_mask[:, None] & (cols < D)[None, :]
    out_offsets = out_rows[:, None] + cols[None, :]
    if STUDENT_GRAD:
        ds = cross[:, None] * t + self_s[:, None] * s
        tl.store(grad_student_ptr + out_offsets, ds.to(grad_student_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        dt = cross[:, None] * s + self_t[:, None] * t
        tl.store(grad_teacher_ptr + out_offsets, dt.to(grad_teacher_ptr.dtype.element_ty), mask=mask)


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
    NUM_CHUNKS: tl.constexpr,  # 1..4: the row is NUM_CHUNKS chunks of BLOCK_D, kept in registers; 0: loop twice
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
    s_rows = _row_offsets(rows, inner_size, s_stride_outer, s_stride_inner)
    t_rows = _row_offsets(rows, inner_size, t_stride_outer, t_stride_inner)
    out_rows = rows * D  # gradients are contiguous (M, D)
    w = tl.load(weight_ptr + _row_offsets(rows, inner_size, w_stride_outer, w_stride_inner), mask=row_mask, other=0.0)
    w = w.to(acc_dtype)
    c = scale * tl.where(w < 0, 0.0, w)  # max(w, 0), NaN kept

    # The row sums: from chunks kept in registers (NUM_CHUNKS ≥ 1), or a first pass over the row.
    if NUM_CHUNKS >= 1:
        s0, t0 = _load_chunk(student_ptr, teacher_ptr, s_rows, t_rows, row_mask, 0, D, s_stride_col,
                             t_stride_col, BLOCK_D, acc_dtype)
        ss = tl.sum(s0 * s0, axis=1)
        tt = tl.sum(t0 * t0, axis=1)
        st = tl.sum(s0 * t0, axis=1)
        if NUM_CHUNKS >= 2:
            s1, t1 = _load_chunk(student_ptr, teacher_ptr, s_rows, t_rows, row_mask, BLOCK_D, D, s_stride_col,
                                 t_stride_col, BLOCK_D, acc_dtype)
            ss += tl.sum(s1 * s1, axis=1)
            tt += tl.sum(t1 * t1, axis=1)
            st += tl.sum(s1 * t1, axis=1)
        if NUM_CHUNKS >= 3:
            s2, t2 = _load_chunk(student_ptr, teacher_ptr, s_rows, t_rows, row_mask, 2 * BLOCK_D, D,
                                 s_stride_col, t_stride_col, BLOCK_D, acc_dtype)
            ss += tl.sum(s2 * s2, axis=1)
            tt += tl.sum(t2 * t2, axis=1)
            st += tl.sum(s2 * t2, axis=1)
        if NUM_CHUNKS >= 4:
            s3, t3 = _load_chunk(student_ptr, teacher_ptr, s_rows, t_rows, row_mask, 3 * BLOCK_D, D,
                                 s_stride_col, t_stride_col, BLOCK_D, acc_dtype)
            ss += tl.sum(s3 * s3, axis=1)
            tt += tl.sum(t3 * t3, axis=1)
            st += tl.sum(s3 * t3, axis=1)
    else:
        ss = tl.zeros([BLOCK_M], acc_dtype)
        tt = tl.zeros([BLOCK_M], acc_dtype)
        st = tl.zeros([BLOCK_M], acc_dtype)
        for d0 in range(0, D, BLOCK_D):
            s, t = _load_chunk(student_ptr, teacher_ptr, s_rows, t_rows, row_mask, d0, D, s_stride_col,
                               t_stride_col, BLOCK_D, acc_dtype)
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

    if NUM_CHUNKS >= 1:
        _store_chunk(grad_student_ptr, grad_teacher_ptr, s0, t0, cross, self_s, self_t, out_rows, row_mask, 0, D,
                     BLOCK_D, STUDENT_GRAD, TEACHER_GRAD)
        if NUM_CHUNKS >= 2:
            _store_chunk(grad_student_ptr, grad_teacher_ptr, s1, t1, cross, self_s, self_t, out_rows, row_mask,
                         BLOCK_D, D, BLOCK_D, STUDENT_GRAD, TEACHER_GRAD)
        if NUM_CHUNKS >= 3:
            _store_chunk(grad_student_ptr, grad_teacher_ptr, s2, t2, cross, self_s, self_t, out_rows, row_mask,
                         2 * BLOCK_D, D, BLOCK_D, STUDENT_GRAD, TEACHER_GRAD)
        if NUM_CHUNKS >= 4:
            _store_chunk(grad_student_ptr, grad_teacher_ptr, s3, t3, cross, self_s, self_t, out_rows, row_mask,
                         3 * BLOCK_D, D, BLOCK_D, STUDENT_GRAD, TEACHER_GRAD)
    else:  # second pass over the row: reload and write the gradients
        for d0 in range(0, D, BLOCK_D):
            s, t = _load_chunk(student_ptr, teacher_ptr, s_rows, t_rows, row_mask, d0, D, s_stride_col,
                               t_stride_col, BLOCK_D, acc_dtype)
            _store_chunk(grad_student_ptr, grad_teacher_ptr, s, t, cross, self_s, self_t, out_rows, row_mask, d0,
                         D, BLOCK_D, STUDENT_GRAD, TEACHER_GRAD)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def row_layout(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor):
    """Describe the rows of student/teacher (..., D) and weight (...) as two strided row dims, copying only
    when that is impossible.

    Returns (student, teacher, weight, inner_size, strides) where strides holds, per tensor, the
    (outer, inner) row strides in elements. Size-1 dims are dropped and adjacent dims merged where all three
    tensors allow it (`utils.merge_dims`); if more than two row dims remain, all three are made contiguous
    (a copy of each non-contiguous one), after which they merge into one.
    """
    if weight.numel() == 0:
        return student, teacher, weight, 1, ((0, 0), (0, 0), (0, 0))
    merged = merge_dims(weight.shape, student.stride()[:-1], teacher.stride()[:-1], weight.stride())
    if len(merged) > 2:
        return row_layout(student.contiguous(), teacher.contiguous(), weight.contiguous())
    while len(merged) < 2:
        merged.insert(0, (1, (0, 0, 0)))
    (_, outer), (inner_size, inner) = merged
    strides = tuple((outer[k], inner[k]) for k in range(3))
    return student, teacher, weight, inner_size, strides


def row_chunks(dim: int) -> tuple[int, int]:
    """(BLOCK_D, chunks): a row of ``dim`` columns as 1 to MAX_CHUNKS power-of-two chunks wasting the fewest
    lanes (fewer chunks on ties), e.g. 768 → 3 × 256, 1024 → 1 × 1024, 48 → 3 × 16; chunks = 0 (a loop
    over MAX_BLOCK_D-wide chunks) for rows too long to keep in registers."""
    if dim > MAX_CHUNKS * MAX_BLOCK_D:
        return MAX_BLOCK_D, 0
    narrowest = min(16, triton.next_power_of_2(max(dim, 1)))  # 16-wide loads at least, unless D < 16
    options = [(max(narrowest, triton.next_power_of_2(triton.cdiv(max(dim, 1), k))), k)
               for k in range(1, MAX_CHUNKS + 1)]
    options = [option for option in options if option[0] <= MAX_BLOCK_D]
    return min(options, key=lambda option: (option[0] * option[1], option[1]))


def _rows_per_block(num_rows: int, block_d: int, chunks: int) -> int:
    """Rows per program: a power of two keeping the row tile within TILE_ELEMENTS values per tensor."""
    budget = max(1, TILE_ELEMENTS // (block_d * max(chunks, 1)))
    return max(1, min(1 << (budget.bit_length() - 1), triton.next_power_of_2(max(num_rows, 1))))


def _layout_args(student, teacher, weight):
    student, teacher, weight, inner_size, strides = row_layout(student, teacher, weight)
    (so, si), (to, ti), (wo, wi) = strides
    args = (inner_size, so, si, student.stride(-1), to, ti, teacher.stride(-1), wo, wi)
    return student, teacher, weight, args


def fod_loss_forward(
    student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (loss, W): the 0-dim loss and Σ max(w, 0), both in the compute dtype (fp32, or fp64 for fp64
    student). One launch."""
    acc = compute_dtype(student.dtype)
    device = student.device
    dim = student.shape[-1]
    num_rows = weight.numel()
    block_d, chunks = row_chunks(dim)
    block_m = _rows_per_block(num_rows, block_d, chunks)
    num_programs = max(1, min(triton.cdiv(num_rows, block_m), MAX_PARTIALS))
    student, teacher, weight, layout = _layout_args(student, teacher, weight)
    partials = torch.empty((2, num_programs), dtype=acc, device=device)
    loss = torch.empty((), dtype=acc, device=device)
    weight_sum = torch.empty((), dtype=acc, device=device)
    with device_guard(device), completion_counter(device) as counter:
        _fod_loss_fwd_kernel[(num_programs,)](
            student, teacher, weight, partials, counter, loss, weight_sum,
            num_rows, dim, *layout,
            EPS=float(eps), BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_P=triton.next_power_of_2(num_programs),
            num_warps=num_warps(block_m * block_d, 8),
        )  # fmt: skip
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
    block_d, chunks = row_chunks(dim)
    block_m = _rows_per_block(num_rows, block_d, chunks)
    student, teacher, weight, layout = _layout_args(student, teacher, weight)
    with device_guard(device):
        _fod_loss_bwd_kernel[(triton.cdiv(num_rows, block_m),)](
            grad_loss, weight_sum, student, teacher, weight,
            # an unrequested gradient's pointer is never dereferenced (its store is compiled out)
            grad_student if student_grad else grad_teacher,
            grad_teacher if teacher_grad else grad_student,
            num_rows, dim, *layout,
            EPS=float(eps), BLOCK_M=block_m, BLOCK_D=block_d, NUM_CHUNKS=chunks,
            STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad,
            num_warps=num_warps(block_m * block_d * max(chunks, 1), 8),
        )  # fmt: skip
    return grad_student, grad_teacher
