"""Triton kernels of the segmentation head straight from patch-resolution masks: loss sums, their backward,
and PLOP's teacher statistics — none of them ever holds the (B, K, H, W) pixel logits.

Bilinear upsampling (align_corners=False, as F.interpolate)
-----------------------------------------------------------
Along one axis of input size n and output size N, output index d reads the input at

    src = max((d + 0.5)·(n/N) − 0.5, 0),  i0 = ⌊src⌋,  i1 = min(i0 + 1, n − 1),  λ = src − i0,

and the logit of class c at pixel (y, x) of image b is

    z_c = (1−λy)(1−λx)·m[b,c,y0,x0] + (1−λy)λx·m[b,c,y0,x1] + λy(1−λx)·m[b,c,y1,x0] + λyλx·m[b,c,y1,x1].

The kernels gather the four K-vectors of a pixel from the masks (a few KB per image: they stay in L1/L2)
and interpolate in registers; the interpolation weights are computed in the accumulation dtype exactly as
PyTorch does (scale n/N in that dtype).

Forward: per-image sums (`_seg_head_sums_kernel`, grid (n_tiles·B,))
--------------------------------------------------------------------
One program owns BLOCK_P pixels of one image and sweeps the classes in chunks of BLOCK_K with an online
softmax: running max m and the masses L_old = Σ_{c<num_old} e^{z_c−m}, L_new = Σ_{c≥num_old} e^{z_c−m}
(rescaled by e^{m_old−m_new} when the max grows), and the label's logit z_y. Per pixel

    lse = m + log(L_old + L_new),  CE = lse − z_y,  P_new = L_new / (L_old + L_new),  P_old = L_old / (…),

P_old from its own mass (not 1 − P_new, which is pure rounding when the new classes hold all the mass).
Two label maps are read per pixel: y (``labels``, the CE targets) and d (``dice_labels``, the dice's masks).
A value outside [0, K) counts as ignore_index. With C_old / C_new = y counted and < / ≥ num_old, valid = d
counted, M_new = valid ∧ d ≥ num_old, M_old = valid ∧ d < num_old, the program writes eight partial sums
over its pixels to partials (B, n_tiles, 8):

    [Σ CE·C_old, Σ CE·C_new, Σ M_old, Σ M_new, Σ P_new·M_new, Σ P_new·valid, Σ P_old·M_old, Σ P_old·valid]

and the per-pixel (lse, P_new, P_old) to pixel_stats (B, 3, H·W), saved for the backward (3·B·H·W values,
K× fewer than the logits). The launcher sums the partials over tiles with torch (a fixed-order reduction:
deterministic, no atomics). Class weights, image weights, smooth, the CE mean and the dice are formed from
these (B, 8) sums by a few tiny torch ops in `incrementer_fast.ops.seg_head`, so autograd differentiates
that combination and hands the kernels the gradient of the sums, g (B, 8).

Backward (VJP of the sums)
--------------------------
Only the CE sums and the four probability sums depend on the logits (the counts do not). For a pixel of
image b with g = g[b],

    ∂(Σ CE·M)/∂z_c = M·(p_c − [c = y]),
    ∂P_new/∂z_c = p_c·P_old for c ≥ num_old, −p_c·P_new for c < num_old,   ∂P_old/∂z_c = −∂P_new/∂z_c,

(the forms without cancellation, using P_new + P_old = 1), so with G_ce = g0·C_old + g1·C_new and
G_p = g4·M_new + g5·valid − g6·M_old − g7·valid,

    dz_c = G_ce·(p_c − [c = y]) + G_p·p_c·(P_old if c ≥ num_old else −P_new),   p_c = e^{z_c − lse}.

dz_c needs only z_c and the saved per-pixel stats, so classes are processed in independent chunks.
The gradient of the masks is the transpose of the interpolation: dm[b,c,Y,X] = Σ_{y,x} Ay[y,Y]·Ax[x,X]·
dz_c(y,x), with Ay[y,Y] = (1−λy)[y0=Y] + λy[y1=Y] (at most two nonzeros per row). A scatter from pixels
to their four low-res neighbours would need float atomics (non-deterministic order); instead
`_seg_head_sums_backward_kernel` is a *gather*: one program per (image b, low-res row Y, class chunk,
low-res column block) visits only the window of high-res pixels whose interpolation touches them: i0(y)
is monotone in y, so the rows touching row Y form one run of about 2·H/h + 1 rows, between
((2Y−1)·H − h)/(2h) and ((2Y+3)·H − h)/(2h) (integer arithmetic with a margin of two rows; rows in the
margin get the weight 0), and likewise the columns touching the column block. The window's pixels,
flattened, are taken BLOCK_X at a time: recompute dz (BLOCK_K × BLOCK_X), scale each pixel by its row
weight Ay[y, Y], and contract with Ax (BLOCK_X × BLOCK_XL, built in registers from the column indices) by
tl.dot into the (BLOCK_K × BLOCK_XL) accumulator. Each pixel's dz is recomputed about twice (two low-res
rows touch a high-res row) instead of being stored (B·K·H·W values);
the gradient is written once, in order: bitwise deterministic. The dot runs in full precision
(input_precision="ieee"; float64 for float64 masks), since TF32 would cost three decimal digits.

PLOP teacher statistics (`_teacher_histogram_kernel`, `_pseudo_label_kernel`, grid (n_tiles·B,))
------------------------------------------------------------------------------------------------
Per pixel of the upsampled teacher, as the reference's ``entropy`` option says. ``"normalized"``: the
argmax of the logits (first index on ties, as torch.argmax) and e = H(p)/log K with H(p) = log L − T/L,
L = Σ e^{z_c−m}, T = Σ e^{z_c−m}·(z_c−m) (online over class chunks: on a max change m → m', L ← αL,
T ← α(T + (m−m')L) with α = e^{m−m'}), which avoids the cancellation of lse − Σ p_c z_c. ``"plop"``
(PLOP_ENTROPY): PLOP's e = −(1/ln(K + 1e-8))·mean_c p_c·log(p_c + 1e-8) / ln K_total needs p_c = e^{z_c−m}/L
with the final m and L inside the log, so a first sweep finds m and L online and a second one sums
p_c·log(p_c + 1e-8) and takes the argmax of p_c (PLOP's ``probs.max``); the two constants are computed in
float64 and rounded once. The histogram kernel adds 1 at (argmax, clamp(⌊e·num_bins⌋, 0,
num_bins−1)) of an int32 histogram for every label-0 pixel with an integer atomic add: integer sums are
exact and order-independent, so the counts are deterministic. The pseudo-label kernel writes the new label
(int64) and per-tile counts of label-0 pixels and of those that took a pseudo-label (B, n_tiles, 2).

All index arithmetic that multiplies by a stride is int64; every load and store is masked; any strides
of masks and labels are read in place; sums accumulate in float32 (float64 for float64 masks). Every grid
is one flat axis (its fastest index first, the image last): CUDA caps grid axes 1 and 2 at 65535, which a
batch (or low-res row) axis would hit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from incrementer_fast._dispatch import INTERPRET

from . import device_guard

NUM_SUMS = 8  # see the module docstring: CE·M_old, CE·M_new, M_old, M_new, P_new·M_new, P_new·valid, P_old·M_old, P_old·valid
# Forward / teacher kernels: BLOCK_P pixels × BLOCK_K classes per step: 32 × 128 fp32 values per gathered
# neighbour keeps the four gathers plus the exp in registers at 4 warps. Backward: tl.dot needs every dim
# ≥ 16; 32 classes × 64 window pixels × 32 low-res columns balances the recomputation (elementwise) against
# the contraction. Under the interpreter every loop iteration and program costs Python overhead whatever
# its size, so there the blocks are as large as the problem (one class chunk, few window steps).
if INTERPRET:
    FWD_BLOCK_P = 256
    FWD_BLOCK_K = 256
    BWD_BLOCK_K = 256
    BWD_BLOCK_X = 512
else:
    FWD_BLOCK_P = 128
    FWD_BLOCK_K = 32
    BWD_BLOCK_K = 32
    BWD_BLOCK_X = 64
BWD_MAX_BLOCK_XL = 32


@triton.jit
def _source_index(dst, in_size, out_size, acc_dtype: tl.constexpr):
    """(i0, i1, λ) of output indices dst (int64) along an axis of input size in_size, output size out_size."""
    # tl.cast, not .to(): Triton specialises an int argument equal to 1 into a constexpr.
    scale = tl.cast(in_size, acc_dtype) / tl.cast(out_size, acc_dtype)
    src = tl.maximum((dst.to(acc_dtype) + 0.5) * scale - 0.5, 0.0)
    i0 = src.to(tl.int64)  # truncation is ⌊·⌋: src ≥ 0
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, src - i0.to(acc_dtype)


@triton.jit
def _interpolated_logits(
    masks_image,  # pointer to masks[b] (class, row, column strides below)
    classes,  # (BLOCK_K,) int64 class indices
    class_mask,  # (BLOCK_K,) classes < K
    pixel_mask,  # (BLOCK_P,) pixels inside the image
    y0, y1, ly,  # (BLOCK_P,) or scalars: source rows and row weight
    x0, x1, lx,  # (BLOCK_P,): source columns and column weight
    stride_mk, stride_my, stride_mx,
    acc_dtype: tl.constexpr,
):
    """(BLOCK_K, BLOCK_P) bilinear logits; 0 outside the masks (the caller sets absent classes to −inf)."""
    mask = class_mask[:, None] & pixel_mask[None, :]
    class_ptr = masks_image + classes[:, None] * stride_mk
    row0 = y0 * stride_my
    row1 = y1 * stride_my
    col0 = x0 * stride_mx
    col1 = x1 * stride_mx
    m00 = tl.load(class_ptr + (row0 + col0)[None, :], mask=mask, other=0.0).to(acc_dtype)
    m01 = tl.load(class_ptr + (row0 + col1)[None, :], mask=mask, other=0.0).to(acc_dtype)
    m10 = tl.load(class_ptr + (row1 + col0)[None, :], mask=mask, other=0.0).to(acc_dtype)
    m11 = tl.load(class_ptr + (row1 + col1)[None, :], mask=mask, other=0.0).to(acc_dtype)
    lx_ = lx[None, :]
    top = m00 + (m01 - m00) * lx_
    bottom = m10 + (m11 - m10) * lx_
    return top + (bottom - top) * ly[None, :]


@triton.jit
def _seg_head_sums_kernel(
    masks_ptr,  # (B, K, h, w) any strides, any float dtype: patch-resolution logits
    labels_ptr,  # (B, H, W) any strides, any integer dtype: CE targets
    dice_labels_ptr,  # (B, H, W) any strides, any integer dtype: the dice's M_old / M_new
    partials_ptr,  # (B, n_tiles, 8) contiguous, accumulation dtype: output, per-tile sums
    pixel_stats_ptr,  # (B, 3, H·W) contiguous, accumulation dtype: output, per-pixel (lse, P_new, P_old)
    K, h, w, H, W,  # classes, mask size, label size
    num_old,  # classes [0, num_old) are old
    ignore_index,  # label value of ignored pixels
    n_tiles,  # cdiv(H·W, BLOCK_P)
    stride_mb, stride_mk, stride_my, stride_mx,  # masks strides
    stride_lb, stride_ly, stride_lx,  # labels strides
    stride_db, stride_dy, stride_dx,  # dice_labels strides
    ACC_DTYPE: tl.constexpr,  # accumulation dtype (tl.float32 or tl.float64)
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_K: tl.constexpr,  # classes per chunk
):
    # Flat grid, tile fastest: a separate batch axis (grid axis 1) would fail on CUDA for B > 65535.
    tile = tl.program_id(0) % n_tiles
    image = (tl.program_id(0) // n_tiles).to(tl.int64)
    num_pixels = tl.cast(H, tl.int64) * W
    pixels = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_image = pixels < num_pixels
    y = pixels // W
    x = pixels % W
    y0, y1, ly = _source_index(y, h, H, ACC_DTYPE)
    x0, x1, lx = _source_index(x, w, W, ACC_DTYPE)
    label = tl.load(
        labels_ptr + image * stride_lb + y * stride_ly + x * stride_lx, mask=in_image, other=ignore_index
    ).to(tl.int64)
    dice_label = tl.load(
        dice_labels_ptr + image * stride_db + y * stride_dy + x * stride_dx, mask=in_image, other=ignore_index
    ).to(tl.int64)
    masks_image = masks_ptr + image * stride_mb

    running_max = tl.full((BLOCK_P,), float("-inf"), ACC_DTYPE)
    mass_old = tl.zeros((BLOCK_P,), ACC_DTYPE)
    mass_new = tl.zeros((BLOCK_P,), ACC_DTYPE)
    label_logit = tl.zeros((BLOCK_P,), ACC_DTYPE)
    for k_start in range(0, K, BLOCK_K):
        classes = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        in_classes = classes < K
        z = _interpolated_logits(
            masks_image, classes, in_classes, in_image, y0, y1, ly, x0, x1, lx,
            stride_mk, stride_my, stride_mx, ACC_DTYPE,
        )
        z = tl.where(in_classes[:, None], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        rescale = tl.exp(running_max - new_max)
        e = tl.exp(z - new_max[None, :])
        is_new_class = (classes >= num_old)[:, None]
        mass_new = mass_new * rescale + tl.sum(tl.where(is_new_class, e, 0.0), axis=0)
        mass_old = mass_old * rescale + tl.sum(tl.where(is_new_class, 0.0, e), axis=0)
        # A label outside [0, K) matches no class: its logit stays 0 (never −inf) and the pixel is ignored.
        is_label = (classes[:, None] == label[None, :]) & in_classes[:, None]
        label_logit += tl.sum(tl.where(is_label, z, 0.0), axis=0)
        running_max = new_max

    total = mass_old + mass_new
    lse = running_max + tl.log(total)
    p_new = mass_new / total
    p_old = mass_old / total
    # Labels outside [0, K) count as ignore_index (see the reference).
    ce_valid = in_image & (label != ignore_index) & (label >= 0) & (label < K)
    ce_new = ce_valid & (label >= num_old)
    ce_old = ce_valid & (label < num_old)
    valid = in_image & (dice_label != ignore_index) & (dice_label >= 0) & (dice_label < K)
    label_new = valid & (dice_label >= num_old)
    label_old = valid & (dice_label < num_old)
    ce = lse - label_logit

    stats_image = pixel_stats_ptr + image * 3 * num_pixels + pixels
    tl.store(stats_image, lse, mask=in_image)
    tl.store(stats_image + num_pixels, p_new, mask=in_image)
    tl.store(stats_image + 2 * num_pixels, p_old, mask=in_image)

    slot = tl.arange(0, 8)
    sums = tl.where(slot == 0, tl.sum(tl.where(ce_old, ce, 0.0), axis=0), 0.0)
    sums += tl.where(slot == 1, tl.sum(tl.where(ce_new, ce, 0.0), axis=0), 0.0)
    sums += tl.where(slot == 2, tl.sum(label_old.to(ACC_DTYPE), axis=0), 0.0)
    sums += tl.where(slot == 3, tl.sum(label_new.to(ACC_DTYPE), axis=0), 0.0)
    sums += tl.where(slot == 4, tl.sum(tl.where(label_new, p_new, 0.0), axis=0), 0.0)
    sums += tl.where(slot == 5, tl.sum(tl.where(valid, p_new, 0.0), axis=0), 0.0)
    sums += tl.where(slot == 6, tl.sum(tl.where(label_old, p_old, 0.0), axis=0), 0.0)
    sums += tl.where(slot == 7, tl.sum(tl.where(valid, p_old, 0.0), axis=0), 0.0)
    tl.store(partials_ptr + (image * n_tiles + tile) * 8 + slot, sums, mask=slot < 8)


@triton.jit
def _seg_head_sums_backward_kernel(
    masks_ptr,  # (B, K, h, w) any strides, any float dtype
    labels_ptr,  # (B, H, W) any strides, any integer dtype: CE targets
    dice_labels_ptr,  # (B, H, W) any strides, any integer dtype: the dice's M_old / M_new
    pixel_stats_ptr,  # (B, 3, H·W) contiguous, accumulation dtype: (lse, P_new, P_old) from the forward
    grad_sums_ptr,  # (B, 8) any strides, float: gradient of the per-image sums
    grad_masks_ptr,  # (B, K, h, w) contiguous, masks dtype: output
    K, h, w, H, W,
    num_old,
    ignore_index,
    n_k_blocks,  # cdiv(K, BLOCK_K)
    n_xl_blocks,  # cdiv(w, BLOCK_XL)
    stride_mb, stride_mk, stride_my, stride_mx,  # masks strides
    stride_lb, stride_ly, stride_lx,  # labels strides
    stride_db, stride_dy, stride_dx,  # dice_labels strides
    stride_gb, stride_gs,  # grad_sums strides
    ACC_DTYPE: tl.constexpr,  # accumulation dtype (tl.float32 or tl.float64)
    BLOCK_K: tl.constexpr,  # classes per program (≥ 16, tl.dot)
    BLOCK_X: tl.constexpr,  # window pixels per step (≥ 16)
    BLOCK_XL: tl.constexpr,  # low-res columns per program (≥ 16)
):
    # Flat grid, (class chunk, column block) fastest, then the low-res row, then the image: rows and images on
    # grid axes 1 and 2 would fail on CUDA beyond 65535 (large batches).
    pid = tl.program_id(0)
    xl_block = pid % n_xl_blocks
    k_block = (pid // n_xl_blocks) % n_k_blocks
    row_and_image = pid // (n_xl_blocks * n_k_blocks)
    low_row = (row_and_image % h).to(tl.int64)
    image = (row_and_image // h).to(tl.int64)
    num_pixels = tl.cast(H, tl.int64) * W

    classes = k_block.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_classes = classes < K
    is_new_class = (classes >= num_old)[:, None]
    low_cols = xl_block.to(tl.int64) * BLOCK_XL + tl.arange(0, BLOCK_XL)
    in_low_cols = low_cols < w

    # Scalar loads, in bounds by construction (the grid has exactly B images; slots 0..7 of 8).
    grad_image = grad_sums_ptr + image * stride_gb
    g_ce_old = tl.load(grad_image).to(ACC_DTYPE)
    g_ce_new = tl.load(grad_image + stride_gs).to(ACC_DTYPE)
    g_pnew_new = tl.load(grad_image + 4 * stride_gs).to(ACC_DTYPE)
    g_pnew_valid = tl.load(grad_image + 5 * stride_gs).to(ACC_DTYPE)
    g_pold_old = tl.load(grad_image + 6 * stride_gs).to(ACC_DTYPE)
    g_pold_valid = tl.load(grad_image + 7 * stride_gs).to(ACC_DTYPE)

    # The window: high-res rows / columns whose interpolation can touch this low-res row / column block
    # (see the module docstring; `//` truncates toward zero, hence the margin of two and the clamps).
    two_h = 2 * tl.cast(h, tl.int64)
    two_w = 2 * tl.cast(w, tl.int64)
    row_begin = tl.maximum(((2 * low_row - 1) * H - h) // two_h - 2, 0)
    row_end = tl.minimum(((2 * low_row + 3) * H - h) // two_h + 2, H)
    first_col = xl_block.to(tl.int64) * BLOCK_XL
    last_col = tl.minimum(first_col + BLOCK_XL, w) - 1
    col_begin = tl.maximum(((2 * first_col - 1) * W - w) // two_w - 2, 0)
    col_end = tl.minimum(((2 * last_col + 3) * W - w) // two_w + 2, W)
    window_cols = col_end - col_begin
    window_size = (row_end - row_begin) * window_cols
    scale_y = tl.cast(h, ACC_DTYPE) / tl.cast(H, ACC_DTYPE)
    scale_x = tl.cast(w, ACC_DTYPE) / tl.cast(W, ACC_DTYPE)

    masks_image = masks_ptr + image * stride_mb
    class_ptr = masks_image + classes[:, None] * stride_mk
    labels_image = labels_ptr + image * stride_lb
    dice_labels_image = dice_labels_ptr + image * stride_db
    stats_image = pixel_stats_ptr + image * 3 * num_pixels
    acc = tl.zeros((BLOCK_K, BLOCK_XL), ACC_DTYPE)
    # The window's pixels, flattened row-major, BLOCK_X at a time (the bilinear source indices and the
    # gather of _interpolated_logits are written out here: this is the hot loop).
    for start in range(0, window_size, BLOCK_X):
        offsets = start + tl.arange(0, BLOCK_X).to(tl.int64)
        in_window = offsets < window_size
        rows = row_begin + offsets // window_cols
        cols = col_begin + offsets % window_cols
        src_y = tl.maximum((rows.to(ACC_DTYPE) + 0.5) * scale_y - 0.5, 0.0)
        y0 = src_y.to(tl.int64)
        y1 = tl.where(y0 < h - 1, y0 + 1, y0)
        ly = src_y - y0.to(ACC_DTYPE)
        src_x = tl.maximum((cols.to(ACC_DTYPE) + 0.5) * scale_x - 0.5, 0.0)
        x0 = src_x.to(tl.int64)
        x1 = tl.where(x0 < w - 1, x0 + 1, x0)
        lx = src_x - x0.to(ACC_DTYPE)
        row_weight = tl.where(y0 == low_row, 1.0 - ly, 0.0) + tl.where(y1 == low_row, ly, 0.0)

        label = tl.load(
            labels_image + rows * stride_ly + cols * stride_lx, mask=in_window, other=ignore_index
        ).to(tl.int64)
        dice_label = tl.load(
            dice_labels_image + rows * stride_dy + cols * stride_dx, mask=in_window, other=ignore_index
        ).to(tl.int64)
        pixel = rows * W + cols
        lse = tl.load(stats_image + pixel, mask=in_window, other=0.0)
        p_new = tl.load(stats_image + num_pixels + pixel, mask=in_window, other=0.0)
        p_old = tl.load(stats_image + 2 * num_pixels + pixel, mask=in_window, other=0.0)
        ce_valid = in_window & (label != ignore_index) & (label >= 0) & (label < K)
        valid = in_window & (dice_label != ignore_index) & (dice_label >= 0) & (dice_label < K)
        label_new = valid & (dice_label >= num_old)
        label_old = valid & (dice_label < num_old)
        g_ce = tl.where(ce_valid & (label < num_old), g_ce_old, 0.0) + tl.where(
            ce_valid & (label >= num_old), g_ce_new, 0.0
        )
        g_p = (
            tl.where(label_new, g_pnew_new, 0.0) + tl.where(valid, g_pnew_valid - g_pold_valid, 0.0)
            - tl.where(label_old, g_pold_old, 0.0)
        )

        mask = in_classes[:, None] & in_window[None, :]
        row0 = y0 * stride_my
        row1 = y1 * stride_my
        col0 = x0 * stride_mx
        col1 = x1 * stride_mx
        m00 = tl.load(class_ptr + (row0 + col0)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        m01 = tl.load(class_ptr + (row0 + col1)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        m10 = tl.load(class_ptr + (row1 + col0)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        m11 = tl.load(class_ptr + (row1 + col1)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        top = m00 + (m01 - m00) * lx[None, :]
        bottom = m10 + (m11 - m10) * lx[None, :]
        z = top + (bottom - top) * ly[None, :]

        p = tl.exp(z - lse[None, :])
        one_hot = (classes[:, None] == label[None, :]).to(ACC_DTYPE)
        mass_factor = tl.where(is_new_class, p_old[None, :], -p_new[None, :])
        dz = g_ce[None, :] * (p - one_hot) + g_p[None, :] * p * mass_factor
        dz = tl.where(mask, dz * row_weight[None, :], 0.0)
        # Ax (BLOCK_X, BLOCK_XL): the weight of low-res column X in each pixel's interpolation.
        col_weight = (
            tl.where(x0[:, None] == low_cols[None, :], 1.0 - lx[:, None], 0.0)
            + tl.where(x1[:, None] == low_cols[None, :], lx[:, None], 0.0)
        )
        col_weight = tl.where(in_window[:, None] & in_low_cols[None, :], col_weight, 0.0)
        acc = tl.dot(dz, col_weight, acc, input_precision="ieee")

    out = grad_masks_ptr + ((image * K + classes[:, None]) * h + low_row) * w + low_cols[None, :]
    tl.store(out, acc, mask=in_classes[:, None] & in_low_cols[None, :])


@triton.jit
def _teacher_pixel_stats(
    masks_ptr, image, pixels, in_image, K, num_classes, h, w, H, W,
    stride_mb, stride_mk, stride_my, stride_mx,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PLOP_ENTROPY: tl.constexpr,
):
    """(prediction (BLOCK_P,) int64, entropy (BLOCK_P,)) of the upsampled teacher at `pixels`.

    PLOP_ENTROPY: PLOP's −(1/ln(K + 1e-8))·mean_c p_c·log(p_c + 1e-8) / ln(num_classes) and the argmax of the
    probabilities (two sweeps over the classes: log(p + 1e-8) needs the final normaliser); otherwise the
    normalised entropy H(p)/ln K and the argmax of the logits in one online sweep.
    """
    y = pixels // W
    x = pixels % W
    y0, y1, ly = _source_index(y, h, H, ACC_DTYPE)
    x0, x1, lx = _source_index(x, w, W, ACC_DTYPE)
    masks_image = masks_ptr + image * stride_mb
    running_max = tl.full((BLOCK_P,), float("-inf"), ACC_DTYPE)
    best = tl.zeros((BLOCK_P,), tl.int64)
    mass = tl.zeros((BLOCK_P,), ACC_DTYPE)
    weighted = tl.zeros((BLOCK_P,), ACC_DTYPE)  # T = Σ e^{z−m}(z−m)
    for k_start in range(0, K, BLOCK_K):
        classes = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        in_classes = classes < K
        z = _interpolated_logits(
            masks_image, classes, in_classes, in_image, y0, y1, ly, x0, x1, lx,
            stride_mk, stride_my, stride_mx, ACC_DTYPE,
        )
        z = tl.where(in_classes[:, None], z, float("-inf"))
        chunk_max = tl.max(z, axis=0)
        new_max = tl.maximum(running_max, chunk_max)
        shift = running_max - new_max
        rescale = tl.exp(shift)
        # Absent classes (z = −inf) get e = 0 and a finite centred logit, so e·centred is 0, not NaN.
        centred = tl.where(in_classes[:, None], z - new_max[None, :], 0.0)
        e = tl.where(in_classes[:, None], tl.exp(centred), 0.0)
        if not PLOP_ENTROPY:
            chunk_arg = tl.argmax(z, axis=0, tie_break_left=True).to(tl.int64) + k_start
            # Strictly greater: on a tie the earlier chunk (lower class index) keeps the argmax.
            best = tl.where(chunk_max > running_max, chunk_arg, best)
            # mass is 0 before the first chunk, where shift is −inf: keep 0·(−inf) out.
            weighted = rescale * (weighted + tl.where(mass > 0, shift, 0.0) * mass)
            weighted += tl.sum(e * centred, axis=0)
        mass = mass * rescale + tl.sum(e, axis=0)
        running_max = new_max
    if PLOP_ENTROPY:
        best_prob = tl.full((BLOCK_P,), -1.0, ACC_DTYPE)
        p_log_p = tl.zeros((BLOCK_P,), ACC_DTYPE)
        for k_start in range(0, K, BLOCK_K):
            classes = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
            in_classes = classes < K
            z = _interpolated_logits(
                masks_image, classes, in_classes, in_image, y0, y1, ly, x0, x1, lx,
                stride_mk, stride_my, stride_mx, ACC_DTYPE,
            )
            # softmax as torch computes it: exp(z − max) / Σ exp(z − max); 0 for absent classes.
            p = tl.where(in_classes[:, None], tl.exp(z - running_max[None, :]) / mass[None, :], 0.0)
            p_log_p += tl.sum(p * tl.log(p + 1e-8), axis=0)
            p_or_absent = tl.where(in_classes[:, None], p, -1.0)
            chunk_best = tl.max(p_or_absent, axis=0)
            chunk_arg = tl.argmax(p_or_absent, axis=0, tie_break_left=True).to(tl.int64) + k_start
            best = tl.where(chunk_best > best_prob, chunk_arg, best)
            best_prob = tl.maximum(best_prob, chunk_best)
        # The constants in float64, then rounded once, as PLOP's Python floats / float32 torch.log give them.
        neg_inv_log_k = (-1.0 / tl.log(tl.cast(K, tl.float64) + 1e-8)).to(ACC_DTYPE)
        max_entropy = tl.log(tl.cast(num_classes, tl.float64)).to(ACC_DTYPE)
        entropy = (neg_inv_log_k * (p_log_p / tl.cast(K, ACC_DTYPE))) / max_entropy
    else:
        entropy = (tl.log(mass) - weighted / mass) / tl.log(tl.cast(K, ACC_DTYPE))
    return best, entropy


@triton.jit
def _teacher_histogram_kernel(
    masks_ptr,  # (B, K, h, w) any strides, any float dtype: teacher masks
    labels_ptr,  # (B, H, W) any strides, any integer dtype
    histogram_ptr,  # (K, num_bins) contiguous int32, zero-initialised: output (integer atomic adds)
    K, num_classes, h, w, H, W,  # num_classes: K_total (PLOP_ENTROPY only)
    num_bins,  # entropy bins over [0, 1]
    n_tiles,  # cdiv(H·W, BLOCK_P)
    stride_mb, stride_mk, stride_my, stride_mx,
    stride_lb, stride_ly, stride_lx,
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PLOP_ENTROPY: tl.constexpr,
):
    tile = tl.program_id(0) % n_tiles  # flat grid, tile fastest (see the sums kernel)
    image = (tl.program_id(0) // n_tiles).to(tl.int64)
    num_pixels = tl.cast(H, tl.int64) * W
    pixels = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_image = pixels < num_pixels
    label = tl.load(
        labels_ptr + image * stride_lb + (pixels // W) * stride_ly + (pixels % W) * stride_lx,
        mask=in_image, other=1,
    )
    prediction, entropy = _teacher_pixel_stats(
        masks_ptr, image, pixels, in_image, K, num_classes, h, w, H, W,
        stride_mb, stride_mk, stride_my, stride_mx, ACC_DTYPE, BLOCK_P, BLOCK_K, PLOP_ENTROPY,
    )
    bins = tl.minimum(tl.maximum((entropy * num_bins).to(tl.int64), 0), num_bins - 1)
    background = in_image & (label == 0)
    tl.atomic_add(histogram_ptr + prediction * num_bins + bins, tl.full((BLOCK_P,), 1, tl.int32), mask=background)


@triton.jit
def _pseudo_label_kernel(
    masks_ptr,  # (B, K, h, w) any strides, any float dtype: teacher masks
    labels_ptr,  # (B, H, W) any strides, any integer dtype
    thresholds_ptr,  # (K,) any stride, float: per-class entropy thresholds
    pseudo_ptr,  # (B, H, W) contiguous int64: output, pseudo-labels
    counts_ptr,  # (B, n_tiles, 2) contiguous int32: output, per tile (#label-0 pixels, #pseudo-labelled)
    K, num_classes, h, w, H, W,  # num_classes: K_total (PLOP_ENTROPY only)
    ignore_index,
    n_tiles,
    stride_mb, stride_mk, stride_my, stride_mx,
    stride_lb, stride_ly, stride_lx,
    stride_t,
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PLOP_ENTROPY: tl.constexpr,
):
    tile = tl.program_id(0) % n_tiles  # flat grid, tile fastest (see the sums kernel)
    image = (tl.program_id(0) // n_tiles).to(tl.int64)
    num_pixels = tl.cast(H, tl.int64) * W
    pixels = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_image = pixels < num_pixels
    label = tl.load(
        labels_ptr + image * stride_lb + (pixels // W) * stride_ly + (pixels % W) * stride_lx,
        mask=in_image, other=1,
    ).to(tl.int64)
    prediction, entropy = _teacher_pixel_stats(
        masks_ptr, image, pixels, in_image, K, num_classes, h, w, H, W,
        stride_mb, stride_mk, stride_my, stride_mx, ACC_DTYPE, BLOCK_P, BLOCK_K, PLOP_ENTROPY,
    )
    threshold = tl.load(thresholds_ptr + prediction * stride_t, mask=in_image, other=0.0).to(ACC_DTYPE)
    background = in_image & (label == 0)
    confident = background & (entropy < threshold)
    pseudo = tl.where(background, tl.where(confident, prediction, ignore_index), label)
    tl.store(pseudo_ptr + image * num_pixels + pixels, pseudo, mask=in_image)
    slot = tl.arange(0, 2)
    counts = tl.where(slot == 0, tl.sum(background.to(tl.int32), axis=0), tl.sum(confident.to(tl.int32), axis=0))
    tl.store(counts_ptr + (image * n_tiles + tile) * 2 + slot, counts, mask=slot < 2)


# ------------------------------------------------------------------------------------------ launchers
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _class_block(num_classes: int, minimum: int, maximum: int) -> int:
    return max(minimum, min(maximum, triton.next_power_of_2(num_classes)))


def seg_head_sums(
    masks: torch.Tensor, labels: torch.Tensor, dice_labels: torch.Tensor, num_old: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image sums (B, 8) and per-pixel (lse, P_new, P_old) (B, 3, H, W), both in the accumulation dtype."""
    batch, num_classes, h, w = masks.shape
    _, height, width = labels.shape
    acc = _acc_dtype(masks.dtype)
    block_k = _class_block(num_classes, 1, FWD_BLOCK_K)
    n_tiles = triton.cdiv(height * width, FWD_BLOCK_P)
    partials = torch.empty((batch, n_tiles, NUM_SUMS), dtype=acc, device=masks.device)
    pixel_stats = torch.empty((batch, 3, height, width), dtype=acc, device=masks.device)
    if batch * height * width > 0:
        with device_guard(masks.device):  # launch on the tensors' GPU, not the current one
            _seg_head_sums_kernel[(n_tiles * batch,)](
                masks, labels, dice_labels, partials, pixel_stats,
                num_classes, h, w, height, width, num_old, ignore_index, n_tiles,
                *masks.stride(), *labels.stride(), *dice_labels.stride(),
                ACC_DTYPE=_tl_dtype(masks.dtype), BLOCK_P=FWD_BLOCK_P, BLOCK_K=block_k, num_warps=4,
            )
    # Fixed-order reduction over the tiles: deterministic.
    return partials.sum(1), pixel_stats


def seg_head_sums_backward(
    grad_sums: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    dice_labels: torch.Tensor,
    pixel_stats: torch.Tensor,
    num_old: int,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient of masks (B, K, h, w), contiguous, in the masks' dtype, from the gradient of the sums (B, 8)."""
    batch, num_classes, h, w = masks.shape
    _, height, width = labels.shape
    grad_masks = torch.empty((batch, num_classes, h, w), dtype=masks.dtype, device=masks.device)
    if grad_masks.numel() == 0:
        return grad_masks
    block_xl = _class_block(w, 16, BWD_MAX_BLOCK_XL)
    n_xl_blocks = triton.cdiv(w, block_xl)
    block_k = _class_block(num_classes, 16, BWD_BLOCK_K)
    n_k_blocks = triton.cdiv(num_classes, block_k)
    with device_guard(masks.device):  # launch on the tensors' GPU, not the current one
        _seg_head_sums_backward_kernel[(n_k_blocks * n_xl_blocks * h * batch,)](
            masks, labels, dice_labels, pixel_stats, grad_sums, grad_masks,
            num_classes, h, w, height, width, num_old, ignore_index, n_k_blocks, n_xl_blocks,
            *masks.stride(), *labels.stride(), *dice_labels.stride(), *grad_sums.stride(),
            ACC_DTYPE=_tl_dtype(masks.dtype), BLOCK_K=block_k, BLOCK_X=BWD_BLOCK_X, BLOCK_XL=block_xl,
            num_warps=4,
        )
    return grad_masks


def teacher_histogram(
    teacher_masks: torch.Tensor, labels: torch.Tensor, num_bins: int, num_classes: int, entropy: str
) -> torch.Tensor:
    """(K, num_bins) int64 counts of label-0 pixels by teacher prediction and entropy bin."""
    batch, num_old, h, w = teacher_masks.shape
    _, height, width = labels.shape
    histogram = torch.zeros((num_old, num_bins), dtype=torch.int32, device=teacher_masks.device)
    n_tiles = triton.cdiv(height * width, FWD_BLOCK_P)
    if batch * n_tiles > 0:
        with device_guard(teacher_masks.device):  # launch on the tensors' GPU, not the current one
            _teacher_histogram_kernel[(n_tiles * batch,)](
                teacher_masks, labels, histogram,
                num_old, num_classes, h, w, height, width, num_bins, n_tiles,
                *teacher_masks.stride(), *labels.stride(),
                ACC_DTYPE=_tl_dtype(teacher_masks.dtype), BLOCK_P=FWD_BLOCK_P,
                BLOCK_K=_class_block(num_old, 2, FWD_BLOCK_K), PLOP_ENTROPY=entropy == "plop", num_warps=4,
            )
    return histogram.to(torch.int64)


def pseudo_label(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int,
    num_classes: int,
    entropy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels (B, H, W) int64, counts (B, 2) int64 = (#label-0 pixels, #pseudo-labelled)) per image."""
    batch, num_old, h, w = teacher_masks.shape
    _, height, width = labels.shape
    n_tiles = triton.cdiv(height * width, FWD_BLOCK_P)
    pseudo = torch.empty((batch, height, width), dtype=torch.int64, device=teacher_masks.device)
    counts = torch.zeros((batch, n_tiles, 2), dtype=torch.int32, device=teacher_masks.device)
    if batch * n_tiles > 0:
        with device_guard(teacher_masks.device):  # launch on the tensors' GPU, not the current one
            _pseudo_label_kernel[(n_tiles * batch,)](
                teacher_masks, labels, thresholds, pseudo, counts,
                num_old, num_classes, h, w, height, width, ignore_index, n_tiles,
                *teacher_masks.stride(), *labels.stride(), thresholds.stride(0),
                ACC_DTYPE=_tl_dtype(teacher_masks.dtype), BLOCK_P=FWD_BLOCK_P,
                BLOCK_K=_class_block(num_old, 2, FWD_BLOCK_K), PLOP_ENTROPY=entropy == "plop", num_warps=4,
            )
    return pseudo, counts.sum(1, dtype=torch.int64)
