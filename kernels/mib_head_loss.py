"""Triton kernels of MiB's unbiased cross-entropy and unbiased distillation straight from patch-resolution
masks: per-image sums in the forward, the gradient of the masks in the backward, never the (B, K, H, W)
pixel logits (see ``incrementer_fast/reference/mib_head.py`` for the losses).

The walk is the seg-head kernels' (``kernels/seg_head.py``): bilinear cells, bands of BAND × BAND cells per
program, (BLOCK_K, BLOCK_R, BLOCK_C) blocks of logits formed from a cell's four corners per class, the
backward gathering, column by column, what reaches its band's outputs (no atomics, written once: bitwise
deterministic). Its cell helpers and launch plan (``seg_head_plan``) are used as they are; what differs
is what is formed per pixel.

Forward (``_mib_head_loss_fwd_kernel``, grid (bands·B,))
-------------------------------------------------------
Per pixel, one sweep over the classes in chunks of BLOCK_K keeps two online softmaxes, one over the old
classes [0, num_old) (max m_o, mass L_o) and one over the new ones (m_n, L_n): each class belongs to one
group, so this costs no more exponentials than one softmax, and lse_old = m_o + log L_o stays exact however
far the old classes are below the new ones (MiB takes a separate logsumexp there). With a teacher it also
keeps the teacher's online softmax of α·t over its num_old classes (m_t, L_t) and S = Σ_c e^{α·t_c − m_t}·z_c
(rescaled with L_t), so that Σ_c q_c·z_c = S / L_t. Then, with z_0 and t_0 interpolated from class 0's own
corners (formed as the chunk's z were) and the label's logit z_y from its own four corners,

    den = logaddexp(lse_old, lse_new),   lse_bkg = logaddexp(z_0, lse_new),   q_0 = e^{α·t_0 − lse_t},
    CE = den − lse_old (label < num_old) or den − z_y (label ≥ num_old),
    kd = (q_0·(lse_bkg − z_0) + S / L_t − den) / num_old

(the reference's q_0·(lse_bkg − den) + Σ_{c ≥ 1} q_c·(z_c − den), using Σ q = 1). A program writes three
sums over its pixels, [Σ CE·counted, Σ counted, Σ kd], to partials (B, bands, 3), reduced over the bands by
the launcher in a fixed order, and per pixel (den, lse_old[, lse_bkg, lse_t, q_0]) to pixel_stats
(B, 2 or 5, H·W) for the backward. A label outside [0, K) counts as ignore_index.

Backward (``_mib_head_loss_bwd_kernel``, grid (class blocks·bands·B,))
----------------------------------------------------------------------
With g_ce, g_kd the gradients of the first and third sums of the pixel's image, p_c = e^{z_c − den},

    dz_c = g_ce·[counted]·(p_c − [label < num_old]·[c < num_old]·e^{z_c − lse_old} − [label ≥ num_old]·[c = y])
         + (g_kd / num_old)·(q_0·[c = 0 or c ≥ num_old]·e^{z_c − lse_bkg} + [1 ≤ c < num_old]·q_c − p_c),

q_c = e^{α·t_c − lse_t} from the teacher's corners of the program's classes. The masks' gradient is the
transpose of the interpolation, contracted columns first and then rows, exactly as the seg-head backward.

Offsets inside an image are int32 unless one spans 2³¹ elements (IDX); image offsets are int64. Every load
and store of tensor data is masked. α arrives as two float32 halves (``split_fp32``) so that a float64
kernel uses the exact double.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .seg_head import (
    _band_cells,
    _band_of,
    _bands,
    _cell_lerps,
    _class_block,
    _launch_constexprs,
    seg_head_plan,
)
from .utils import compute_dtype, device_guard, launch_target, split_fp32

NUM_SUMS = 3  # Σ CE·counted, Σ counted, Σ kd (see the module docstring)
STATS_WITHOUT_TEACHER = 2  # den, lse_old
STATS_WITH_TEACHER = 5  # den, lse_old, lse_bkg, lse_t, q_0


@triton.jit
def _logaddexp(a, b):
    """log(e^a + e^b) of finite a, b."""
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _online_group(running_max, mass, z, in_group):
    """One chunk of an online softmax over the lanes ``in_group`` of z (BLOCK_K, BLOCK_R, BLOCK_C): the new
    (max, mass). A max still −inf (no lane of the group seen yet) is shifted by 0, never by −inf (no NaN)."""
    new_max = tl.maximum(running_max, tl.max(tl.where(in_group, z, float("-inf")), axis=0))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    e = tl.where(in_group, tl.exp(z - shift[None, :, :]), 0.0)
    return new_max, mass * tl.exp(running_max - shift) + tl.sum(e, axis=0)


@triton.jit
def _corner_logit(plane_ptr, row0, row1, col0, col1, ly, lx, in_tile, ACC_DTYPE: tl.constexpr):
    """The interpolated logit of one class per pixel (plane_ptr: (BLOCK_R, BLOCK_C) pointers to each pixel's
    class plane), formed as ``_cell_lerps`` forms a chunk's (the same rounding)."""
    v00 = tl.load(plane_ptr + row0 + col0, mask=in_tile, other=0.0).to(ACC_DTYPE)
    v01 = tl.load(plane_ptr + row0 + col1, mask=in_tile, other=0.0).to(ACC_DTYPE)
    v10 = tl.load(plane_ptr + row1 + col0, mask=in_tile, other=0.0).to(ACC_DTYPE)
    v11 = tl.load(plane_ptr + row1 + col1, mask=in_tile, other=0.0).to(ACC_DTYPE)
    top = v00 + (v01 - v00) * lx[None, :]
    return top + ((v10 + (v11 - v10) * lx[None, :]) - top) * ly[:, None]


@triton.jit
def _mib_head_loss_fwd_kernel(
    masks_ptr,  # (B, K, h, w) any strides, any float dtype: student logits at patch resolution
    teacher_ptr,  # (B, num_old, h, w) any strides, any float dtype (masks_ptr when there is no teacher)
    labels_ptr,  # (B, H, W) any strides, any integer dtype
    partials_ptr,  # (B, bands, 3) contiguous, accumulation dtype: output
    pixel_stats_ptr,  # (B, 2 or 5, H·W) contiguous, accumulation dtype: output
    K, h, w, H, W,
    num_old,
    ignore_index,
    alpha_hi, alpha_lo,  # kd_alpha = alpha_hi + alpha_lo (split_fp32)
    n_row_bands, n_col_bands,
    stride_mb, stride_mk, stride_my, stride_mx,
    stride_tb, stride_tk, stride_ty, stride_tx,
    stride_lb, stride_ly, stride_lx,
    ACC_DTYPE: tl.constexpr,
    IDX: tl.constexpr,
    BAND: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    NUM_STATS: tl.constexpr,
):
    image, first_row, first_col = _band_of(tl.program_id(0), n_row_bands, n_col_bands, BAND)
    masks_image = masks_ptr + image * stride_mb
    teacher_image = teacher_ptr + image * stride_tb
    labels_image = labels_ptr + image * stride_lb
    num_pixels = tl.cast(H, tl.int64) * W
    stats_image = pixel_stats_ptr + image * NUM_STATS * num_pixels
    alpha = tl.cast(alpha_hi, ACC_DTYPE) + tl.cast(alpha_lo, ACC_DTYPE)
    tile_rows = tl.arange(0, BLOCK_R).to(IDX)
    tile_cols = tl.arange(0, BLOCK_C).to(IDX)
    chunk = tl.arange(0, BLOCK_K).to(IDX)
    sum_ce = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    sum_counted = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    sum_kd = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)

    scale_y, scale_x, cell_index, row_starts, col_starts = _band_cells(first_row, first_col, h, w, H, W,
                                                                       ACC_DTYPE, BAND)
    row_start = tl.sum(tl.where(cell_index == 0, row_starts, 0))
    for Y in range(first_row, tl.minimum(first_row + BAND, h)):
        row_end = tl.sum(tl.where(cell_index == Y + 1 - first_row, row_starts, 0))
        row0 = tl.cast(Y, IDX) * stride_my
        row1 = tl.cast(tl.minimum(Y + 1, h - 1), IDX) * stride_my
        teacher_row0 = tl.cast(Y, IDX) * stride_ty
        teacher_row1 = tl.cast(tl.minimum(Y + 1, h - 1), IDX) * stride_ty
        col_start = tl.sum(tl.where(cell_index == 0, col_starts, 0))
        for X in range(first_col, tl.minimum(first_col + BAND, w)):
            col_end = tl.sum(tl.where(cell_index == X + 1 - first_col, col_starts, 0))
            col0 = tl.cast(X, IDX) * stride_mx
            col1 = tl.cast(tl.minimum(X + 1, w - 1), IDX) * stride_mx
            teacher_col0 = tl.cast(X, IDX) * stride_tx
            teacher_col1 = tl.cast(tl.minimum(X + 1, w - 1), IDX) * stride_tx
            for r_start in range(row_start, row_end, BLOCK_R):
                rows = r_start + tile_rows
                ly = tl.maximum((rows.to(ACC_DTYPE) + 0.5) * scale_y - 0.5, 0.0) - tl.cast(Y, ACC_DTYPE)
                for c_start in range(col_start, col_end, BLOCK_C):
                    cols = c_start + tile_cols
                    lx = tl.maximum((cols.to(ACC_DTYPE) + 0.5) * scale_x - 0.5, 0.0) - tl.cast(X, ACC_DTYPE)
                    in_tile = (rows < row_end)[:, None] & (cols < col_end)[None, :]
                    label = tl.load(labels_image + rows[:, None] * stride_ly + cols[None, :] * stride_lx,
                                    mask=in_tile, other=ignore_index).to(tl.int64)
                    counted = in_tile & (label != ignore_index) & (label >= 0) & (label < K)

                    max_old = tl.full((BLOCK_R, BLOCK_C), float("-inf"), ACC_DTYPE)
                    mass_old = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
                    max_new = tl.full((BLOCK_R, BLOCK_C), float("-inf"), ACC_DTYPE)
                    mass_new = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
                    max_teacher = tl.full((BLOCK_R, BLOCK_C), float("-inf"), ACC_DTYPE)
                    mass_teacher = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
                    teacher_sum = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)  # S = Σ e^{α·t_c − m_t}·z_c
                    for k_start in range(0, K, BLOCK_K):
                        classes = k_start + chunk
                        in_classes = classes < K
                        top, span = _cell_lerps(masks_image + classes * stride_mk, in_classes,
                                                row0, row1, col0, col1, lx, ACC_DTYPE)
                        z = top[:, None, :] + span[:, None, :] * ly[None, :, None]  # 0 for absent classes
                        is_old = (classes < num_old)[:, None, None]
                        max_old, mass_old = _online_group(max_old, mass_old, z, is_old)
                        max_new, mass_new = _online_group(max_new, mass_new, z, in_classes[:, None, None] & ~is_old)
                        if HAS_TEACHER:
                            t_top, t_span = _cell_lerps(teacher_image + classes * stride_tk, classes < num_old,
                                                        teacher_row0, teacher_row1, teacher_col0, teacher_col1,
                                                        lx, ACC_DTYPE)
                            scaled = alpha * (t_top[:, None, :] + t_span[:, None, :] * ly[None, :, None])
                            # Chunk 0 holds class 0, so the teacher's max is finite from the first chunk on.
                            new_max = tl.maximum(max_teacher, tl.max(tl.where(is_old, scaled, float("-inf")), axis=0))
                            rescale = tl.exp(max_teacher - new_max)
                            e = tl.where(is_old, tl.exp(scaled - new_max[None, :, :]), 0.0)
                            mass_teacher = mass_teacher * rescale + tl.sum(e, axis=0)
                            teacher_sum = teacher_sum * rescale + tl.sum(e * z, axis=0)
                            max_teacher = new_max

                    lse_old = max_old + tl.log(mass_old)
                    lse_new = max_new + tl.log(mass_new)
                    den = _logaddexp(lse_old, lse_new)
                    # The label's own logit; a pixel not counted, or with an old label, reads class 0's.
                    label_class = tl.where(counted & (label >= num_old), label, 0).to(IDX)
                    label_logit = _corner_logit(masks_image + label_class * stride_mk, row0, row1, col0, col1,
                                                ly, lx, in_tile, ACC_DTYPE)
                    ce = den - tl.where(label < num_old, lse_old, label_logit)
                    sum_ce += tl.where(counted, ce, 0.0)
                    sum_counted += counted.to(ACC_DTYPE)

                    pixel = rows.to(tl.int64)[:, None] * W + cols[None, :]
                    tl.store(stats_image + pixel, den, mask=in_tile)
                    tl.store(stats_image + num_pixels + pixel, lse_old, mask=in_tile)
                    if HAS_TEACHER:
                        background_logit = _corner_logit(masks_image + tl.zeros((BLOCK_R, BLOCK_C), IDX), row0, row1,
                                                         col0, col1, ly, lx, in_tile, ACC_DTYPE)
                        teacher_background = alpha * _corner_logit(
                            teacher_image + tl.zeros((BLOCK_R, BLOCK_C), IDX), teacher_row0, teacher_row1,
                            teacher_col0, teacher_col1, ly, lx, in_tile, ACC_DTYPE)
                        lse_background = _logaddexp(background_logit, lse_new)
                        lse_teacher = max_teacher + tl.log(mass_teacher)
                        q_background = tl.exp(teacher_background - lse_teacher)
                        kd = (q_background * (lse_background - background_logit) + teacher_sum / mass_teacher
                              - den) / tl.cast(num_old, ACC_DTYPE)
                        sum_kd += tl.where(in_tile, kd, 0.0)
                        tl.store(stats_image + 2 * num_pixels + pixel, lse_background, mask=in_tile)
                        tl.store(stats_image + 3 * num_pixels + pixel, lse_teacher, mask=in_tile)
                        tl.store(stats_image + 4 * num_pixels + pixel, q_background, mask=in_tile)
            col_start = col_end
        row_start = row_end
    partials = partials_ptr + tl.program_id(0).to(tl.int64) * 3
    tl.store(partials, tl.sum(tl.sum(sum_ce, axis=1), axis=0))
    tl.store(partials + 1, tl.sum(tl.sum(sum_counted, axis=1), axis=0))
    tl.store(partials + 2, tl.sum(tl.sum(sum_kd, axis=1), axis=0))


@triton.jit
def _mib_head_loss_bwd_kernel(
    masks_ptr,  # (B, K, h, w) any strides, any float dtype
    teacher_ptr,  # (B, num_old, h, w) any strides (masks_ptr when there is no teacher)
    labels_ptr,  # (B, H, W) any strides, any integer dtype
    pixel_stats_ptr,  # (B, 2 or 5, H·W) contiguous, accumulation dtype: from the forward
    grad_sums_ptr,  # (B, 3) any strides, float: gradient of the per-image sums
    grad_masks_ptr,  # (B, K, h, w) contiguous, masks dtype: output
    K, h, w, H, W,
    num_old,
    ignore_index,
    alpha_hi, alpha_lo,
    n_k_blocks,
    n_row_bands, n_col_bands,
    stride_mb, stride_mk, stride_my, stride_mx,
    stride_tb, stride_tk, stride_ty, stride_tx,
    stride_lb, stride_ly, stride_lx,
    stride_gb, stride_gs,
    ACC_DTYPE: tl.constexpr,
    IDX: tl.constexpr,
    BAND: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    NUM_STATS: tl.constexpr,
):
    # Flat grid: class chunk fastest, then the band, then the image (as the seg-head backward).
    k_block = tl.program_id(0) % n_k_blocks
    image, first_row, first_col = _band_of(tl.program_id(0) // n_k_blocks, n_row_bands, n_col_bands, BAND)
    classes = (k_block * BLOCK_K + tl.arange(0, BLOCK_K)).to(IDX)
    in_classes = classes < K
    is_old = (classes < num_old)[:, None, None]
    is_background = ((classes == 0) | (classes >= num_old))[:, None, None]  # the KD's merged background
    band_rows = tl.arange(0, BAND)
    tile_rows = tl.arange(0, BLOCK_R).to(IDX)
    tile_cols = tl.arange(0, BLOCK_C).to(IDX)
    alpha = tl.cast(alpha_hi, ACC_DTYPE) + tl.cast(alpha_lo, ACC_DTYPE)

    # Scalar loads, in bounds by construction (the grid has exactly B images; slots 0 and 2 of 3).
    grad_image = grad_sums_ptr + image * stride_gb
    g_ce = tl.load(grad_image).to(ACC_DTYPE)
    g_kd = tl.load(grad_image + 2 * stride_gs).to(ACC_DTYPE) / tl.cast(num_old, ACC_DTYPE)

    class_ptr = masks_ptr + image * stride_mb + classes * stride_mk
    teacher_class_ptr = teacher_ptr + image * stride_tb + classes * stride_tk
    labels_image = labels_ptr + image * stride_lb
    num_pixels = tl.cast(H, tl.int64) * W
    stats_image = pixel_stats_ptr + image * NUM_STATS * num_pixels
    out_ptr = grad_masks_ptr + ((image * K + classes.to(tl.int64)[:, None]) * h
                                + (first_row + band_rows)[None, :]) * w
    out_mask = in_classes[:, None] & (first_row + band_rows < h)[None, :]

    first_y = tl.maximum(first_row - 1, 0)
    first_x = tl.maximum(first_col - 1, 0)
    carry = tl.zeros((BLOCK_K, BAND), ACC_DTYPE)
    scale_y, scale_x, cell_index, row_starts, col_starts = _band_cells(first_y, first_x, h, w, H, W, ACC_DTYPE, BAND)
    col_start = tl.sum(tl.where(cell_index == 0, col_starts, 0))
    for X in range(first_x, tl.minimum(first_col + BAND, w)):
        col_end = tl.sum(tl.where(cell_index == X + 1 - first_x, col_starts, 0))
        col0 = tl.cast(X, IDX) * stride_mx
        col1 = tl.cast(tl.minimum(X + 1, w - 1), IDX) * stride_mx
        teacher_col0 = tl.cast(X, IDX) * stride_tx
        teacher_col1 = tl.cast(tl.minimum(X + 1, w - 1), IDX) * stride_tx
        to_column = tl.zeros((BLOCK_K, BAND), ACC_DTYPE)
        to_next_column = tl.zeros((BLOCK_K, BAND), ACC_DTYPE)
        row_start = tl.sum(tl.where(cell_index == 0, row_starts, 0))
        for Y in range(first_y, tl.minimum(first_row + BAND, h)):
            row_end = tl.sum(tl.where(cell_index == Y + 1 - first_y, row_starts, 0))
            row0 = tl.cast(Y, IDX) * stride_my
            row1 = tl.cast(tl.minimum(Y + 1, h - 1), IDX) * stride_my
            teacher_row0 = tl.cast(Y, IDX) * stride_ty
            teacher_row1 = tl.cast(tl.minimum(Y + 1, h - 1), IDX) * stride_ty
            here = band_rows == Y - first_row
            below = band_rows == tl.minimum(Y + 1, h - 1) - first_row
            column_here = tl.zeros((BLOCK_K,), ACC_DTYPE)
            column_below = tl.zeros((BLOCK_K,), ACC_DTYPE)
            next_column_here = tl.zeros((BLOCK_K,), ACC_DTYPE)
            next_column_below = tl.zeros((BLOCK_K,), ACC_DTYPE)
            for r_start in range(row_start, row_end, BLOCK_R):
                rows = r_start + tile_rows
                ly = tl.maximum((rows.to(ACC_DTYPE) + 0.5) * scale_y - 0.5, 0.0) - tl.cast(Y, ACC_DTYPE)
                for c_start in range(col_start, col_end, BLOCK_C):
                    cols = c_start + tile_cols
                    lx = tl.maximum((cols.to(ACC_DTYPE) + 0.5) * scale_x - 0.5, 0.0) - tl.cast(X, ACC_DTYPE)
                    in_tile = (rows < row_end)[:, None] & (cols < col_end)[None, :]
                    label = tl.load(labels_image + rows[:, None] * stride_ly + cols[None, :] * stride_lx,
                                    mask=in_tile, other=ignore_index).to(tl.int64)
                    counted = in_tile & (label != ignore_index) & (label >= 0) & (label < K)
                    pixel = rows.to(tl.int64)[:, None] * W + cols[None, :]
                    # +inf outside the tile: every probability is 0 there.
                    den = tl.load(stats_image + pixel, mask=in_tile, other=float("inf"))
                    lse_old = tl.load(stats_image + num_pixels + pixel, mask=in_tile, other=float("inf"))
                    top, span = _cell_lerps(class_ptr, in_classes, row0, row1, col0, col1, lx, ACC_DTYPE)
                    z = top[:, None, :] + span[:, None, :] * ly[None, :, None]
                    p = tl.exp(z - den[None, :, :])
                    g_pixel = tl.where(counted, g_ce, 0.0)
                    old_label = (label < num_old)[None, :, :]
                    # The CE: p_c − (the label's share of its target mass).
                    dz = g_pixel[None, :, :] * p
                    dz -= tl.where(old_label & is_old, g_pixel[None, :, :] * tl.exp(z - lse_old[None, :, :]), 0.0)
                    dz -= tl.where(~old_label & (classes[:, None, None] == label[None, :, :]), g_pixel[None, :, :], 0.0)
                    if HAS_TEACHER:
                        lse_background = tl.load(stats_image + 2 * num_pixels + pixel, mask=in_tile,
                                                 other=float("inf"))
                        lse_teacher = tl.load(stats_image + 3 * num_pixels + pixel, mask=in_tile,
                                              other=float("inf"))
                        q_background = tl.load(stats_image + 4 * num_pixels + pixel, mask=in_tile, other=0.0)
                        t_top, t_span = _cell_lerps(teacher_class_ptr, in_classes & (classes < num_old),
                                                    teacher_row0, teacher_row1, teacher_col0, teacher_col1, lx,
                                                    ACC_DTYPE)
                        q = tl.exp(alpha * (t_top[:, None, :] + t_span[:, None, :] * ly[None, :, None])
                                   - lse_teacher[None, :, :])
                        kd_target = tl.where(is_background,
                                             q_background[None, :, :] * tl.exp(z - lse_background[None, :, :]),
                                             q)
                        dz += g_kd * tl.where(in_tile[None, :, :], kd_target - p, 0.0)
                    dz_next = dz * lx[None, None, :]
                    row_sums = tl.sum(dz - dz_next, axis=2)
                    next_row_sums = tl.sum(dz_next, axis=2)
                    column_here += tl.sum(row_sums * (1.0 - ly)[None, :], axis=1)
                    column_below += tl.sum(row_sums * ly[None, :], axis=1)
                    next_column_here += tl.sum(next_row_sums * (1.0 - ly)[None, :], axis=1)
                    next_column_below += tl.sum(next_row_sums * ly[None, :], axis=1)
            to_column += (tl.where(here[None, :], column_here[:, None], 0.0)
                          + tl.where(below[None, :], column_below[:, None], 0.0))
            to_next_column += (tl.where(here[None, :], next_column_here[:, None], 0.0)
                               + tl.where(below[None, :], next_column_below[:, None], 0.0))
            row_start = row_end
        column = to_column + carry + tl.where(X == w - 1, to_next_column, 0.0)
        tl.store(out_ptr + X, column.to(grad_masks_ptr.dtype.element_ty), mask=out_mask & (X >= first_col))
        carry = to_next_column
        col_start = col_end


# ------------------------------------------------------------------------------------------ launchers
def _teacher_args(masks: torch.Tensor, teacher_masks: torch.Tensor | None) -> tuple:
    """(teacher tensor, its strides, HAS_TEACHER, NUM_STATS): the masks stand in for an absent teacher (never
    read: HAS_TEACHER is False)."""
    if teacher_masks is None:
        return masks, masks.stride(), False, STATS_WITHOUT_TEACHER
    return teacher_masks, teacher_masks.stride(), True, STATS_WITH_TEACHER


def mib_head_loss_forward(
    masks: torch.Tensor, labels: torch.Tensor, teacher_masks: torch.Tensor | None, num_old: int,
    kd_alpha: float, ignore_index: int, *, band: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image sums (B, 3) and per-pixel stats (B, 2 or 5, H, W), both in the accumulation dtype.
    ``band``: cells per side of a program (≥ 2, a power of two); None: the launch plan's."""
    batch, num_classes, h, w = masks.shape
    _, height, width = labels.shape
    acc = compute_dtype(masks.dtype)
    plan = seg_head_plan(launch_target(masks.device))
    band = plan.fwd_band if band is None else band
    n_row_bands, n_col_bands = _bands(h, w, band)
    teacher, teacher_strides, has_teacher, num_stats = _teacher_args(masks, teacher_masks)
    partials = torch.empty((batch, n_row_bands * n_col_bands, NUM_SUMS), dtype=acc, device=masks.device)
    pixel_stats = torch.empty((batch, num_stats, height, width), dtype=acc, device=masks.device)
    if batch * height * width > 0:
        constexprs = _launch_constexprs(plan, _class_block(num_classes, plan.fwd_block_ks), masks, labels, teacher)
        with device_guard(masks.device):
            _mib_head_loss_fwd_kernel[(n_row_bands * n_col_bands * batch,)](
                masks, teacher, labels, partials, pixel_stats,
                num_classes, h, w, height, width, num_old, ignore_index, *split_fp32(kd_alpha),
                n_row_bands, n_col_bands, *masks.stride(), *teacher_strides, *labels.stride(),
                BAND=band, HAS_TEACHER=has_teacher, NUM_STATS=num_stats, **constexprs,
            )
    else:
        partials.zero_()
    return partials.sum(1), pixel_stats


def mib_head_loss_backward(
    grad_sums: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, teacher_masks: torch.Tensor | None,
    pixel_stats: torch.Tensor, num_old: int, kd_alpha: float, ignore_index: int, *, band: int | None = None,
) -> torch.Tensor:
    """Gradient of masks (B, K, h, w), contiguous, in the masks' dtype, from the gradient of the sums (B, 3)."""
    batch, num_classes, h, w = masks.shape
    grad_masks = torch.empty((batch, num_classes, h, w), dtype=masks.dtype, device=masks.device)
    if grad_masks.numel() == 0:
        return grad_masks
    _, height, width = labels.shape
    if height * width == 0:
        return grad_masks.zero_()
    plan = seg_head_plan(launch_target(masks.device))
    band = plan.bwd_band if band is None else band
    teacher, teacher_strides, has_teacher, num_stats = _teacher_args(masks, teacher_masks)
    constexprs = _launch_constexprs(plan, _class_block(num_classes, plan.bwd_block_ks), masks, labels, teacher)
    n_k_blocks = triton.cdiv(num_classes, constexprs["BLOCK_K"])
    n_row_bands, n_col_bands = _bands(h, w, band)
    with device_guard(masks.device):
        _mib_head_loss_bwd_kernel[(n_k_blocks * n_row_bands * n_col_bands * batch,)](
            masks, teacher, labels, pixel_stats, grad_sums, grad_masks,
            num_classes, h, w, height, width, num_old, ignore_index, *split_fp32(kd_alpha), n_k_blocks,
            n_row_bands, n_col_bands, *masks.stride(), *teacher_strides, *labels.stride(), *grad_sums.stride(),
            BAND=band, HAS_TEACHER=has_teacher, NUM_STATS=num_stats, **constexprs,
        )
    return grad_masks
