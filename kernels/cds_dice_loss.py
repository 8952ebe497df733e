"""Triton kernels of the CDS old/new dice loss: forward partial sums, a fixed-order finalisation, backward.

Forward
-------
logits (B, C, *spatial) are read as (B, C, S) with S = prod(spatial); labels (B, *spatial) as (B, S).
For one pixel s of image b, with x_c its logits,

    P_c = exp(x_c − m) / Σ_j exp(x_j − m),   m = max_j x_j,
    P_new = L_new / (L_new + L_old),  P_old = L_old / (L_new + L_old),
    L_new = Σ_{c ≥ num_old} exp(x_c − m),    L_old = Σ_{c < num_old} exp(x_c − m).

P_old is computed from its own sum L_old, not as 1 − P_new: when the new classes take almost all the mass,
1 − P_new is pure rounding, while the gradient below is proportional to P_old. The kernel sweeps the channels
in chunks of BLOCK_C with an online max (rescaling L_new and L_old by exp(m_old − m_new) when the max grows),
so a pixel's logits are read exactly once whatever C is. With valid = (label ≠ ignore_index ∧ 0 ≤ label < C)
(a label outside [0, C) that is not ignore_index counts as ignored, as in the reference),
M_new = valid ∧ label ≥ num_old and M_old = valid ∧ label < num_old, each image needs six sums over its
pixels:

    I_new = Σ P_new·M_new,  Q_new = Σ P_new·valid,  T_new = Σ M_new     (and the same three for "old"),

    dice_k = 1 − (2·I_k + smooth) / (Q_k + T_k + smooth),   loss = (1/B) Σ_b (dice_new + dice_old).

(An image without valid pixels has Q_k = T_k = I_k = 0: with smooth = 0 its dice_k is taken as 0, the value
every smooth > 0 gives it, rather than 0/0, and it gets no gradient; see reference.dice_from_sums.)

One launch, `_cds_dice_loss_fwd_kernel`, grid (n_chunks·B,): each program owns a contiguous run of S-tiles
of one image, keeps the six sums per pixel lane in registers across its tiles and writes six scalars to
partials (6, B, n_chunks) — per-program partials, no atomics on the sums. Then each program increments a
counter (one int32 atomic per program) and the program that finds itself last (`_finalize`) adds the
partials in a fixed order into stats (6, B), forms the per-image dice and the batch mean, and resets the
counter (`utils.completion_counter`). No float atomics: two runs give bitwise the same loss, stats and
gradients, whichever program finishes last. n_chunks is chosen so that B·n_chunks is a few programs per
SM, which keeps the final sum tiny. A batch of 0 images launches nothing: the loss is 0.

Backward (VJP)
--------------
With N_k = 2·I_k + smooth and D_k = Q_k + T_k + smooth (k ∈ {new, old}), the derivative of dice_k with
respect to P_k at a valid pixel is

    ∂dice_k/∂P_k = N_k / D_k² − 2·M_k / D_k      ("miss" value N_k/D_k² when M_k = 0, "hit" value when 1),

and 0 at an ignored pixel. Scaled by the upstream gradient g and the 1/B of the mean, this gives per pixel
a = g/B · ∂dice_new/∂P_new and b = g/B · ∂dice_old/∂P_old. Since P_new and P_old are sums of softmax
outputs, ∂L/∂P_c = d_c with d_c = a for c ≥ num_old and b otherwise, and the softmax VJP
dx_c = P_c (d_c − Σ_j P_j d_j) = P_c (d_c − a·P_new − b·P_old) simplifies, using P_new + P_old = 1, to

    dx_c = P_c · P_old · (a − b)    for c ≥ num_old,
    dx_c = −P_c · P_new · (a − b)   for c < num_old,

a form without cancellation. The backward kernel (grid (n_tiles·B,)) loads the six stats of its image and
g (a pointer, so a 0-dim or stride-0 upstream gradient costs no host sync), recomputes the softmax of its
tile and writes the gradient once. When the channels fit one chunk (next_pow2(C) ≤ BACKWARD_ONE_CHUNK = 256,
ADE20K's 151 classes included) the tile stays in registers and the logits are read once; above that a
first sweep finds max and sums and a second re-reads the tile (from L2: a C × BLOCK_S tile is tens of KB)
to write the gradient. The forward reads each logit once in either case (its online max needs no second
sweep), so it keeps 64-wide chunks above FORWARD_ONE_CHUNK = 128 classes (151 → 192 lanes, not 256); the
backward takes the 256-lane tile (1.7× the lanes of exp work, hidden under memory time) rather than a
second read of the logits.

Layout: any strides. The spatial dims of logits, labels (and the gradient) are merged into at most two
(outer, inner) dims with their own strides, so channels-last and transposed views run in place; when they
merge into one (contiguous NCHW, channels-last) the kernels skip the div/mod of the two-dim case, which
also lets Triton see unit strides and vectorise the loads. Only when the spatial layout cannot be expressed
with two dims (≥ 3 spatial dims permuted in a non-mergeable way) are logits and labels copied to a
contiguous layout first (one extra read and write of the logits, and of the gradient in the backward).
All index arithmetic that multiplies by a stride is in int64 (B·C·S may exceed 2^31); every load and store
is masked; sums accumulate in float32 (float64 for float64 logits). Block sizes are fixed per C (no
autotuning), so the interpreter runs exactly the configuration a GPU runs. Grids are one flat axis (pixel
tile or chunk fastest, then the image): CUDA caps grid axes 1 and 2 at 65535, which a batch axis would hit.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import (
    compute_dtype,
    completion_counter,
    device_guard,
    launch_target,
    num_warps,
    split_fp32,
    two_dims,
)

# Channels up to this many (after rounding to a power of two) are held as one register tile; above it the
# kernels sweep chunks of CHUNK_C channels (see the module docstring for why the two limits differ).
FORWARD_ONE_CHUNK = 128
BACKWARD_ONE_CHUNK = 256
CHUNK_C = 64
# Elements of one (BLOCK_C × BLOCK_S) tile: 8192 fp32 values over 8 warps is 32 registers per thread.
TILE_ELEMENTS = 8192
NUM_STATS = 6  # I_new, Q_new, T_new, I_old, Q_old, T_old (see the module docstring)


# n_chunks is not specialised: with tt.divisibility = 16 on it (64 chunks at 512², batch 8) Triton 3.8's
# TritonGPUOptimizeThreadLocality pass fails on this kernel ("PassManager::run failed"; found by
# tests/test_cuda_codegen.py compiling with the JIT's specialisation). It only indexes the partials.
@triton.jit(do_not_specialize=["n_chunks"])
def _cds_dice_loss_fwd_kernel(
    logits_ptr,  # (B, C, S_outer, S_inner) via the four strides below, any float dtype
    labels_ptr,  # (B, S_outer, S_inner) via the three strides below, any integer dtype
    partials_ptr,  # (6, B, n_chunks) contiguous, accumulation dtype (float32 or float64): scratch
    counter_ptr,  # (1,) int32, 0 on entry and on exit: programs done
    stats_ptr,  # (6, B) contiguous, accumulation dtype: output, per-image sums (saved for backward)
    loss_ptr,  # () accumulation dtype: output, the loss
    B,  # batch size
    C,  # number of classes
    S,  # pixels per image (S_outer · S_inner)
    S_inner,  # size of the inner merged spatial dim (read only when SPATIAL_2D)
    num_old,  # classes [0, num_old) are old, [num_old, C) new
    ignore_index,  # label value that marks an ignored pixel
    n_tiles,  # cdiv(S, BLOCK_S): S-tiles per image
    n_chunks,  # programs per image along S
    tiles_per_chunk,  # S-tiles handled by one program (a contiguous run)
    stride_xb, stride_xc, stride_xo, stride_xi,  # logits strides: batch, class, outer, inner spatial
    stride_yb, stride_yo, stride_yi,  # labels strides: batch, outer, inner spatial
    smooth_hi,  # smooth = smooth_hi + smooth_lo: two fp32 scalars, so the fp64 path gets smooth exactly
    smooth_lo,
    BLOCK_C: tl.constexpr,  # channels per chunk
    BLOCK_S: tl.constexpr,  # pixels per tile
    SPATIAL_2D: tl.constexpr,  # two merged spatial dims; False: one (pixel · inner stride, no div/mod)
    BLOCK_B: tl.constexpr,  # images per step of the final sum
    BLOCK_T: tl.constexpr,  # partials per step of the final sum
):
    # Flat grid, chunk fastest: a separate batch axis (grid axis 1) would fail on CUDA for B > 65535.
    chunk = tl.program_id(0) % n_chunks
    image = (tl.program_id(0) // n_chunks).to(tl.int64)
    acc_dtype = partials_ptr.dtype.element_ty
    logits_image = logits_ptr + image * stride_xb
    labels_image = labels_ptr + image * stride_yb
    channel_offsets = tl.arange(0, BLOCK_C)

    inter_new = tl.zeros((BLOCK_S,), acc_dtype)
    prob_new = tl.zeros((BLOCK_S,), acc_dtype)
    count_new = tl.zeros((BLOCK_S,), acc_dtype)
    inter_old = tl.zeros((BLOCK_S,), acc_dtype)
    prob_old = tl.zeros((BLOCK_S,), acc_dtype)
    count_old = tl.zeros((BLOCK_S,), acc_dtype)

    tile_begin = chunk.to(tl.int64) * tiles_per_chunk  # int64 loop bounds: tile · BLOCK_S stays int64
    tile_end = tl.minimum(tile_begin + tiles_per_chunk, n_tiles)
    for tile in range(tile_begin, tile_end):
        pixels = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        in_image = pixels < S
        if SPATIAL_2D:
            outer = pixels // S_inner
            inner = pixels % S_inner
            pixel_offsets = outer * stride_xo + inner * stride_xi
            label_offsets = outer * stride_yo + inner * stride_yi
        else:  # keeps Triton's contiguity analysis: unit strides give vectorised loads
            pixel_offsets = pixels * stride_xi
            label_offsets = pixels * stride_yi
        label = tl.load(labels_image + label_offsets, mask=in_image, other=0)

        running_max = tl.full((BLOCK_S,), float("-inf"), acc_dtype)
        mass_new = tl.zeros((BLOCK_S,), acc_dtype)
        mass_old = tl.zeros((BLOCK_S,), acc_dtype)
        for c_start in range(0, C, BLOCK_C):
            channels = c_start + channel_offsets
            in_channels = channels < C
            x = tl.load(
                logits_image + channels[:, None].to(tl.int64) * stride_xc + pixel_offsets[None, :],
                mask=in_channels[:, None] & in_image[None, :],
                other=0.0,
            ).to(acc_dtype)
            x = tl.where(in_channels[:, None], x, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            rescale = tl.exp(running_max - new_max)
            e = tl.exp(x - new_max[None, :])
            is_new_class = (channels >= num_old)[:, None]
            mass_new = mass_new * rescale + tl.sum(tl.where(is_new_class, e, 0.0), axis=0)
            mass_old = mass_old * rescale + tl.sum(tl.where(is_new_class, 0.0, e), axis=0)
            running_max = new_max

        total = mass_new + mass_old
        p_new = mass_new / total
        p_old = mass_old / total
        valid = in_image & (label != ignore_index) & (label >= 0) & (label < C)
        label_new = valid & (label >= num_old)
        label_old = valid & (label < num_old)
        inter_new += tl.where(label_new, p_new, 0.0)
        prob_new += tl.where(valid, p_new, 0.0)
        count_new += label_new.to(acc_dtype)
        inter_old += tl.where(label_old, p_old, 0.0)
        prob_old += tl.where(valid, p_old, 0.0)
        count_old += label_old.to(acc_dtype)

    # The grid is exactly n_chunks·B programs: these six scalar addresses are always inside partials.
    plane = B * n_chunks
    out = partials_ptr + image * n_chunks + chunk
    tl.store(out, tl.sum(inter_new, axis=0))
    tl.store(out + plane, tl.sum(prob_new, axis=0))
    tl.store(out + 2 * plane, tl.sum(count_new, axis=0))
    tl.store(out + 3 * plane, tl.sum(inter_old, axis=0))
    tl.store(out + 4 * plane, tl.sum(prob_old, axis=0))
    tl.store(out + 5 * plane, tl.sum(count_old, axis=0))
    # Last program done: every thread's store above precedes the counter's release (barrier, then an
    # acquire-release atomic at GPU scope), and the last program's acquire precedes its loads, which bypass
    # L1 (.cg) so that they see the other programs' partials.
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if done == B * n_chunks - 1:
        _finalize(partials_ptr, stats_ptr, loss_ptr, B, n_chunks, smooth_hi, smooth_lo, BLOCK_B, BLOCK_T)
        tl.store(counter_ptr, 0)  # ready for the next launch on this stream


@triton.jit
def _finalize(
    partials_ptr,  # (6, B, n_chunks) contiguous, accumulation dtype: the programs' partial sums
    stats_ptr,  # (6, B) contiguous, accumulation dtype: output, per-image sums (saved for backward)
    loss_ptr,  # () accumulation dtype: output, the loss
    B,  # batch size
    n_chunks,  # partials per image
    smooth_hi,  # smooth = smooth_hi + smooth_lo
    smooth_lo,
    BLOCK_B: tl.constexpr,  # images per step
    BLOCK_T: tl.constexpr,  # partials per step
):
    """The fixed-order sums of the partials into stats (6, B), the per-image dice and the batch mean."""
    acc_dtype = stats_ptr.dtype.element_ty
    smooth = tl.cast(smooth_hi, acc_dtype) + tl.cast(smooth_lo, acc_dtype)
    plane = B * n_chunks
    dice_sum = tl.zeros((BLOCK_B,), acc_dtype)
    for b_start in range(0, B, BLOCK_B):
        images = b_start + tl.arange(0, BLOCK_B)
        in_batch = images < B
        inter_new = tl.zeros((BLOCK_B,), acc_dtype)
        prob_new = tl.zeros((BLOCK_B,), acc_dtype)
        count_new = tl.zeros((BLOCK_B,), acc_dtype)
        inter_old = tl.zeros((BLOCK_B,), acc_dtype)
        prob_old = tl.zeros((BLOCK_B,), acc_dtype)
        count_old = tl.zeros((BLOCK_B,), acc_dtype)
        for t_start in range(0, n_chunks, BLOCK_T):
            chunks = t_start + tl.arange(0, BLOCK_T)
            mask = in_batch[:, None] & (chunks < n_chunks)[None, :]
            ptrs = partials_ptr + images[:, None].to(tl.int64) * n_chunks + chunks[None, :]
            inter_new += tl.sum(tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
            prob_new += tl.sum(tl.load(ptrs + plane, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
            count_new += tl.sum(tl.load(ptrs + 2 * plane, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
            inter_old += tl.sum(tl.load(ptrs + 3 * plane, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
            prob_old += tl.sum(tl.load(ptrs + 4 * plane, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
            count_old += tl.sum(tl.load(ptrs + 5 * plane, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
        tl.store(stats_ptr + images, inter_new, mask=in_batch)
        tl.store(stats_ptr + B + images, prob_new, mask=in_batch)
        tl.store(stats_ptr + 2 * B + images, count_new, mask=in_batch)
        tl.store(stats_ptr + 3 * B + images, inter_old, mask=in_batch)
        tl.store(stats_ptr + 4 * B + images, prob_old, mask=in_batch)
        tl.store(stats_ptr + 5 * B + images, count_old, mask=in_batch)
        # An image without valid pixels has D_k = smooth: with smooth = 0 its dice is 0, the value every
        # smooth > 0 gives it (reference.dice_from_sums), not 0/0.
        den_new = prob_new + count_new + smooth
        den_old = prob_old + count_old + smooth
        dice_new = tl.where(den_new == 0, 0.0, 1.0 - (2.0 * inter_new + smooth) / tl.where(den_new == 0, 1.0, den_new))
        dice_old = tl.where(den_old == 0, 0.0, 1.0 - (2.0 * inter_old + smooth) / tl.where(den_old == 0, 1.0, den_old))
        dice_sum += tl.where(in_batch, dice_new + dice_old, 0.0)
    tl.store(loss_ptr, tl.sum(dice_sum, axis=0) / B)


@triton.jit
def _cds_dice_loss_bwd_kernel(
    logits_ptr,  # (B, C, S_outer, S_inner) via the four strides below, any float dtype
    labels_ptr,  # (B, S_outer, S_inner) via the three strides below, any integer dtype
    grad_ptr,  # (B, C, S_outer, S_inner) via its four strides, logits' dtype: output, ∂loss/∂logits
    stats_ptr,  # (6, B) contiguous, accumulation dtype: per-image sums from the forward
    grad_loss_ptr,  # () upstream gradient of the loss (read through its pointer: no host sync)
    B,  # batch size
    C,  # number of classes
    S,  # pixels per image
    S_inner,  # size of the inner merged spatial dim (read only when SPATIAL_2D)
    num_old,  # classes [0, num_old) are old, [num_old, C) new
    ignore_index,  # label value that marks an ignored pixel
    n_tiles,  # cdiv(S, BLOCK_S): programs per image
    smooth_hi,  # smooth = smooth_hi + smooth_lo (see the finalize kernel)
    smooth_lo,
    stride_xb, stride_xc, stride_xo, stride_xi,  # logits strides
    stride_yb, stride_yo, stride_yi,  # labels strides
    stride_gb, stride_gc, stride_go, stride_gi,  # gradient strides
    BLOCK_C: tl.constexpr,  # channels per chunk
    BLOCK_S: tl.constexpr,  # pixels per program
    ONE_CHUNK: tl.constexpr,  # BLOCK_C ≥ C: keep the tile in registers, read the logits once
    SPATIAL_2D: tl.constexpr,  # two merged spatial dims; False: one (pixel · inner stride, no div/mod)
):
    # Flat grid, tile fastest: a separate batch axis (grid axis 1) would fail on CUDA for B > 65535.
    tile = tl.program_id(0) % n_tiles
    image = (tl.program_id(0) // n_tiles).to(tl.int64)
    acc_dtype = stats_ptr.dtype.element_ty
    smooth = tl.cast(smooth_hi, acc_dtype) + tl.cast(smooth_lo, acc_dtype)

    # Per-image coefficients: the "miss" and "hit" values of ∂dice_k/∂P_k, times g/B.
    scale = tl.load(grad_loss_ptr).to(acc_dtype) / B
    inter_new = tl.load(stats_ptr + image)
    prob_new = tl.load(stats_ptr + B + image)
    count_new = tl.load(stats_ptr + 2 * B + image)
    inter_old = tl.load(stats_ptr + 3 * B + image)
    prob_old = tl.load(stats_ptr + 4 * B + image)
    count_old = tl.load(stats_ptr + 5 * B + image)
    # D_k = 0 only for an image without valid pixels (smooth = 0): none of its pixels takes a gradient, and
    # 1 keeps the unused coefficients finite.
    den_new = prob_new + count_new + smooth
    den_old = prob_old + count_old + smooth
    den_new = tl.where(den_new == 0, 1.0, den_new)
    den_old = tl.where(den_old == 0, 1.0, den_old)
    miss_new = scale * (2.0 * inter_new + smooth) / (den_new * den_new)
    miss_old = scale * (2.0 * inter_old + smooth) / (den_old * den_old)
    hit_new = miss_new - 2.0 * scale / den_new
    hit_old = miss_old - 2.0 * scale / den_old

    pixels = tile.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_image = pixels < S
    if SPATIAL_2D:
        outer = pixels // S_inner
        inner = pixels % S_inner
        pixel_offsets = outer * stride_xo + inner * stride_xi
        label_offsets = outer * stride_yo + inner * stride_yi
        grad_pixel_offsets = outer * stride_go + inner * stride_gi
    else:
        pixel_offsets = pixels * stride_xi
        label_offsets = pixels * stride_yi
        grad_pixel_offsets = pixels * stride_gi
    label = tl.load(labels_ptr + image * stride_yb + label_offsets, mask=in_image, other=0)
    valid = in_image & (label != ignore_index) & (label >= 0) & (label < C)
    label_new = label >= num_old
    a = tl.where(label_new, hit_new, miss_new)
    b = tl.where(label_new, miss_old, hit_old)
    a_minus_b = tl.where(valid, a - b, 0.0)

    logits_image = logits_ptr + image * stride_xb
    grad_image = grad_ptr + image * stride_gb
    channel_offsets = tl.arange(0, BLOCK_C)

    if ONE_CHUNK:
        in_channels = channel_offsets < C
        mask = in_channels[:, None] & in_image[None, :]
        x = tl.load(
            logits_image + channel_offsets[:, None].to(tl.int64) * stride_xc + pixel_offsets[None, :],
            mask=mask,
            other=0.0,
        ).to(acc_dtype)
        x = tl.where(in_channels[:, None], x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=0)[None, :])
        is_new_class = (channel_offsets >= num_old)[:, None]
        mass_new = tl.sum(tl.where(is_new_class, e, 0.0), axis=0)
        mass_old = tl.sum(tl.where(is_new_class, 0.0, e), axis=0)
        inv_total = 1.0 / (mass_new + mass_old)
        # dx_c = e_c/total · (P_old or −P_new) · (a − b)
        factor_new = mass_old * inv_total * inv_total * a_minus_b
        factor_old = -mass_new * inv_total * inv_total * a_minus_b
        grad = e * tl.where(is_new_class, factor_new[None, :], factor_old[None, :])
        tl.store(
            grad_image + channel_offsets[:, None].to(tl.int64) * stride_gc + grad_pixel_offsets[None, :],
            grad.to(grad_ptr.dtype.element_ty),
            mask=mask,
        )
    else:
        running_max = tl.full((BLOCK_S,), float("-inf"), acc_dtype)
        mass_new = tl.zeros((BLOCK_S,), acc_dtype)
        mass_old = tl.zeros((BLOCK_S,), acc_dtype)
        for c_start in range(0, C, BLOCK_C):
            channels = c_start + channel_offsets
            in_channels = channels < C
            x = tl.load(
                logits_image + channels[:, None].to(tl.int64) * stride_xc + pixel_offsets[None, :],
                mask=in_channels[:, None] & in_image[None, :],
                other=0.0,
            ).to(acc_dtype)
            x = tl.where(in_channels[:, None], x, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            rescale = tl.exp(running_max - new_max)
            e = tl.exp(x - new_max[None, :])
            is_new_class = (channels >= num_old)[:, None]
            mass_new = mass_new * rescale + tl.sum(tl.where(is_new_class, e, 0.0), axis=0)
            mass_old = mass_old * rescale + tl.sum(tl.where(is_new_class, 0.0, e), axis=0)
            running_max = new_max
        inv_total = 1.0 / (mass_new + mass_old)
        factor_new = mass_old * inv_total * inv_total * a_minus_b
        factor_old = -mass_new * inv_total * inv_total * a_minus_b
        for c_start in range(0, C, BLOCK_C):
            channels = c_start + channel_offsets
            in_channels = channels < C
            mask = in_channels[:, None] & in_image[None, :]
            x = tl.load(
                logits_image + channels[:, None].to(tl.int64) * stride_xc + pixel_offsets[None, :],
                mask=mask,
                other=float("-inf"),  # e = 0 on masked lanes (0 − max could overflow exp)
            ).to(acc_dtype)
            e = tl.exp(x - running_max[None, :])
            is_new_class = (channels >= num_old)[:, None]
            grad = e * tl.where(is_new_class, factor_new[None, :], factor_old[None, :])
            tl.store(
                grad_image + channels[:, None].to(tl.int64) * stride_gc + grad_pixel_offsets[None, :],
                grad.to(grad_ptr.dtype.element_ty),
                mask=mask,
            )


def _blocks(num_classes: int, block_c: int | None, block_s: int | None, one_chunk: int) -> tuple[int, int, bool]:
    if block_c is None:
        pow2 = triton.next_power_of_2(num_classes)
        block_c = pow2 if pow2 <= one_chunk else CHUNK_C
    if block_s is None:
        block_s = max(16, min(1024, TILE_ELEMENTS // block_c))
    return block_c, block_s, block_c >= num_classes


def _program_target(device: torch.device) -> int:
    """Forward programs to aim for: four per SM of the launch's target keeps the GPU busy and the final sum
    tiny."""
    return 4 * launch_target(device).multiprocessors


def cds_dice_loss_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_old: int,
    ignore_index: int,
    smooth: float,
    *,
    block_c: int | None = None,
    block_s: int | None = None,
    chunks_per_image: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (0-dim) and per-image stats (6, B), both float32 (float64 for float64 logits).

    block_c, block_s and chunks_per_image override the automatic choices (tests use them to reach the
    chunked-channel path and multi-tile programs on small inputs).
    """
    batch, num_classes = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    num_pixels = math.prod(spatial)
    plan = two_dims(spatial, logits.stride()[2:], labels.stride()[1:])
    if plan is None:  # ≥ 3 spatial dims in a non-mergeable order: one copy (documented above)
        logits = logits.reshape(batch, num_classes, num_pixels)
        labels = labels.reshape(batch, num_pixels)
        plan = two_dims((num_pixels,), logits.stride()[2:], labels.stride()[1:])
    s_inner, spatial_2d, ((stride_xo, stride_xi), (stride_yo, stride_yi)) = plan

    acc = compute_dtype(logits.dtype)
    block_c, block_s, _ = _blocks(num_classes, block_c, block_s, FORWARD_ONE_CHUNK)
    n_tiles = triton.cdiv(num_pixels, block_s)
    if chunks_per_image is None:
        chunks_per_image = triton.cdiv(_program_target(logits.device), max(batch, 1))
    tiles_per_chunk = max(1, triton.cdiv(n_tiles, chunks_per_image))
    n_chunks = max(1, triton.cdiv(n_tiles, tiles_per_chunk))

    device = logits.device
    stats = torch.empty((NUM_STATS, batch), dtype=acc, device=device)
    if batch == 0:  # no image: the mean over the batch is taken as 0 (as in the reference), nothing to launch
        return torch.zeros((), dtype=acc, device=device), stats
    partials = torch.empty((NUM_STATS, batch, n_chunks), dtype=acc, device=device)
    loss = torch.empty((), dtype=acc, device=device)
    smooth_hi, smooth_lo = split_fp32(smooth)
    block_b = min(16, triton.next_power_of_2(batch))
    block_t = min(128, triton.next_power_of_2(n_chunks))
    with device_guard(device), completion_counter(device) as counter:  # launch on the tensors' GPU
        _cds_dice_loss_fwd_kernel[(n_chunks * batch,)](
            logits, labels, partials, counter, stats, loss,
            batch, num_classes, num_pixels, s_inner, num_old, ignore_index,
            n_tiles, n_chunks, tiles_per_chunk,
            logits.stride(0), logits.stride(1), stride_xo, stride_xi,
            labels.stride(0), stride_yo, stride_yi,
            smooth_hi, smooth_lo,
            BLOCK_C=block_c, BLOCK_S=block_s, SPATIAL_2D=spatial_2d, BLOCK_B=block_b, BLOCK_T=block_t,
            num_warps=num_warps(block_c * block_s, 32),
        )  # fmt: skip
    return loss, stats


def cds_dice_loss_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    num_old: int,
    ignore_index: int,
    smooth: float,
    *,
    block_c: int | None = None,
    block_s: int | None = None,
) -> torch.Tensor:
    """∂loss/∂logits in logits' dtype and layout (torch.empty_like), from the forward's stats (6, B)."""
    grad = torch.empty_like(logits)
    batch, num_classes = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    num_pixels = math.prod(spatial)
    if grad.numel() == 0:
        return grad
    out = grad
    plan = two_dims(spatial, logits.stride()[2:], labels.stride()[1:], grad.stride()[2:])
    if plan is None:  # ≥ 3 spatial dims in a non-mergeable order: contiguous copies (documented above)
        logits = logits.reshape(batch, num_classes, num_pixels)
        labels = labels.reshape(batch, num_pixels)
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        plan = two_dims((num_pixels,), logits.stride()[2:], labels.stride()[1:], out.stride()[2:])
    s_inner, spatial_2d, ((stride_xo, stride_xi), (stride_yo, stride_yi), (stride_go, stride_gi)) = plan

    block_c, block_s, one_chunk = _blocks(num_classes, block_c, block_s, BACKWARD_ONE_CHUNK)
    n_tiles = triton.cdiv(num_pixels, block_s)
    smooth_hi, smooth_lo = split_fp32(smooth)
    with device_guard(logits.device):  # launch on the tensors' GPU, not the current one
        _cds_dice_loss_bwd_kernel[(n_tiles * batch,)](
            logits, labels, out, stats, grad_loss,
            batch, num_classes, num_pixels, s_inner, num_old, ignore_index, n_tiles, smooth_hi, smooth_lo,
            logits.stride(0), logits.stride(1), stride_xo, stride_xi,
            labels.stride(0), stride_yo, stride_yi,
            out.stride(0), out.stride(1), stride_go, stride_gi,
            BLOCK_C=block_c, BLOCK_S=block_s, ONE_CHUNK=one_chunk, SPATIAL_2D=spatial_2d,
            num_warps=num_warps(block_c * block_s, 32),
        )  # fmt: skip
    if out is not grad:
        grad.copy_(out.view(grad.shape))
    return grad
