"""Triton kernels of cosine_mask: the normalised patch/class similarity masks of the mask-transformer decoder.

Forward
-------
patches P (B, N, D), classes C (B, K, D), a scalar scale s. With x̂ = x / max(‖x‖₂, eps):

    masks[b, k, n] = s · ⟨ĉ[b, k], p̂[b, n]⟩ = s · ⟨c[b, k], p[b, n]⟩ · ι_c[b, k] · ι_p[b, n],
    ι_x = 1 / max(‖x‖, eps).

So the normalisation never has to be materialised: one program per (b, N tile, K tile) walks D in blocks,
accumulates the raw dot products P·Cᵀ with `tl.dot` and, from the very same loaded tiles, the squared norms
of its patch and class rows ("norms for free", no extra pass); the epilogue multiplies by
s·ι_p[:, None]·ι_c[None, :] and stores the tile straight into the contiguous (B, K, N) output, so
`masks.view(B, K, h, w)` costs nothing. The programs of the first K tile also write the patch norms ‖p‖
(B, N), those of the first N tile the class norms ‖c‖ (B, K): the backward needs them and recomputes
nothing. The tile is (patches × classes): the class count is the dot's N dimension, which tensor cores
issue in steps of 8, so K = 21 takes three 8-wide tiles (24 lanes, 1.14×) instead of a 64-wide one (3×).

Backward (the VJP)
------------------
Write raw[k, n] = ⟨ĉ_k, p̂_n⟩ (so masks = s·raw) and G = s·dM for the upstream gradient dM (B, K, N). The
bilinear part gives the gradients with respect to the normalised vectors

    dp̂_n = Σ_k G[k, n] ĉ_k,        dĉ_k = Σ_n G[k, n] p̂_n,        ds = Σ_{b,k,n} dM · raw.

Through x̂ = x / max(‖x‖, eps): when ‖x‖ ≥ eps, x̂ = x/‖x‖ has Jacobian (I − x̂x̂ᵀ)/‖x‖; when ‖x‖ < eps the
clamp is constant, x̂ = x/eps, and the Jacobian is I/eps (torch's clamp_min passes the gradient at
‖x‖ = eps exactly, hence ≥). Both cases in one formula:

    dx = (dx̂ − x̂ · ⟨x̂, dx̂⟩ · [‖x‖ ≥ eps]) · ι_x.

The row dot products need no full row of dx̂: ⟨p̂_n, dp̂_n⟩ = Σ_k dM[k, n] masks[k, n] =: σ_p[n] and
⟨ĉ_k, dĉ_k⟩ = Σ_n dM[k, n] masks[k, n] =: σ_c[k] (masks = s·raw carries the factor s). Hence

    dp_n = (s · Σ_k dM[k, n] ĉ_k − p̂_n σ_p[n] [‖p_n‖ ≥ eps]) · ι_p[n]
    dc_k = (s · Σ_n dM[k, n] p̂_n − ĉ_k σ_c[k] [‖c_k‖ ≥ eps]) · ι_c[k]
    ds   = Σ_k ⟨ĉ_k, Σ_n dM[k, n] p̂_n⟩                                  (no division by s: s may be 0)

The backward reads the saved masks and norms and recomputes no forward product. One launch,
`_cosine_mask_bwd_kernel`, computes both input gradients: its first programs compute dp, the others dc, each with
`_input_grad_tile` — one program per (b, tile of rows of x, tile of D) accumulates Σ_j dM[r, j] ŷ_j over the
partner's rows j with `tl.dot` (ŷ = y·ι_y formed on the fly from the saved norms), and σ_x from the same
dM tile and the matching masks tile, then applies the
projection in the epilogue. When the scale needs a gradient the dc programs also write their share of
ds, Σ over their tile of ĉ · (Σ_n dM p̂), and a fixed-order torch sum adds the partials. No atomics: the
gradients are bitwise reproducible. The tiles are transposed, (D × rows of x), so the rows of x (K for dc)
are again the dot's N dimension.

Precision and tensor cores
--------------------------
Accumulation is fp32 (fp64 for fp64 inputs, with IEEE fp64 dots).
* fp32 inputs: every dot runs with ``input_precision="tf32x3"``: Triton splits each fp32 operand into a
  TF32 "big" part and a TF32 remainder and issues three TF32 tensor-core products (big·big, big·small,
  small·big), which keeps ~fp32 accuracy (relative error of a product ~2^-21 instead of TF32's 2^-11) at
  tensor-core speed. Triton's interpreter computes such a dot as a plain fp32 matmul (numpy), so the
  parity suite run through the interpreter checks the algorithm, not the TF32 split; the GPU parity tests
  (benchmarks/gpu_check.sh) check the split against the same fp32 bound.
* fp16/bf16 inputs: the forward dot takes the 16-bit tiles as they are (products of 16-bit numbers are
  exact in fp32). The backward dots take ŷ (an fp32 value) and dM converted to fp32, with
  ``input_precision="tf32"``: dM is exact in TF32 when it is 16-bit (TF32 keeps fp16's 10-bit mantissa),
  ŷ is rounded to TF32 (2^-12 relative), well inside the bounds of 16-bit gradients. Under Triton's interpreter a bf16 `tl.dot` is
  unreliable, so there bf16 tiles are upcast and dotted in fp32 (the same exact products).

Masks in a dtype less precise than the inputs' (``out_dtype`` bf16 for fp32 inputs) would make σ
inexact: then the launcher's caller keeps the masks in the inputs' dtype for the backward (see
incrementer_fast/ops/cosine_mask.py).

Tiles and grids
---------------
Chosen on the host from the sizes, not autotuned, so Triton's interpreter (and the performance ledger,
which counts what the interpreter issues) runs exactly the tiles and grids of a GPU launch, and compile
time stays one kernel per shape class. Class and row tiles are the largest power of two ≤ 64 that wastes
at most 15 % of the work on padding (`utils.pow2_tile`); the other tile grows from 16 only as long as the
grid keeps at least two programs per multiprocessor of the launch's target (`utils.launch_target`: the GPU's own
SMs, or the selected plan's for CPU tensors through the interpreter).
At ViT-B/16 512²,
batch 8 (N = 1024, D = 768): K = 151 → forward tiles 128 × 32 patches × classes (320 programs), backward
tiles (D × rows) dp 64 × 64 (1536 programs) and dc 64 × 32 (480 programs); K = 21 → forward 64 × 8 (384),
dc 64 × 8 (288). Reduction steps (the dots' K, ≥ 16 for Triton 3.6): 32 features forward, 32 classes for dp
(K = 21 is padded to 32 there: 1.52× that product's work, 1.27× over the three products), 32 patches for dc.

Limits: fp32 inputs whose squared row norms overflow fp32 (‖x‖ ≳ 1e19) give inf norms, like the reference.
Offsets are int64 throughout (outputs beyond 2^31 elements work); every load and store is masked; inputs
and dM may have any strides, including 0 (an expanded `.sum()` gradient, classes expanded over the batch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import utils
from .utils import (
    Target,
    compute_dtype,
    device_guard,
    launch_target,
    num_warps,
    pow2_tile,
    split_fp32,
    tl_dtype,
)

# Class/row tiles waste at most this share of the work on padding (K = 151 → 32-wide tiles, 160 lanes).
MAX_PADDING = 1.15
# The grid keeps at least this many programs per multiprocessor where the tiles allow it.
PROGRAMS_PER_SM = 2
# Tile values per thread above which a program takes 8 warps instead of 4. With these (and the tile caps
# below) ptxas reports no register spills for sm_90 at the paper shapes, fp32 and bf16; 32 per thread, a
# 64-wide D step in the forward or a 128-wide D tile or 64-deep reduction step in the backward all spilled.
VALUES_PER_THREAD = 16


@triton.jit
def _scale(scale_ptr, scale_hi, scale_lo, ACC_DTYPE: tl.constexpr, SCALE_TENSOR: tl.constexpr):
    """The scale s: from its tensor (a learnable temperature), or from the two fp32 halves of a Python float
    (no device tensor, hence no fill launch, for a fixed scale)."""
    if SCALE_TENSOR:
        return tl.load(scale_ptr).to(ACC_DTYPE)
    return tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)


@triton.jit
def _cosine_mask_fwd_kernel(
    patches_ptr,  # (B, N, D) any strides
    classes_ptr,  # (B, K, D) any strides
    scale_ptr,  # () the scale s, any float dtype, when SCALE_TENSOR (else any pointer, never read)
    scale_hi,  # s = scale_hi + scale_lo (two fp32 scalars: exact for fp64) when not SCALE_TENSOR
    scale_lo,
    masks_ptr,  # (B, K, N) contiguous output, in the requested out_dtype
    norm_p_ptr,  # (B, N) out: ‖p[b, n]‖ in ACC_DTYPE, written by the programs of the first K tile
    norm_c_ptr,  # (B, K) out: ‖c[b, k]‖ in ACC_DTYPE, written by the programs of the first N tile
    N,  # number of patches
    K,  # number of classes
    D,  # feature size
    stride_pb, stride_pn, stride_pd,  # patches strides
    stride_cb, stride_ck, stride_cd,  # classes strides
    EPS: tl.constexpr,  # norm clamp x̂ = x / max(‖x‖, EPS); constexpr so fp64 sees it unrounded (a compile per eps)
    DOT_DTYPE: tl.constexpr,  # dtype the tiles enter tl.dot in (16-bit inputs as they are, else ACC_DTYPE)
    DOT_PRECISION: tl.constexpr,  # "tf32x3" for fp32, "ieee" for fp64; 16-bit dots ignore it ("tf32")
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 inputs
    SCALE_TENSOR: tl.constexpr,  # s is read from scale_ptr (a tensor scale); else scale_hi + scale_lo
    BLOCK_N: tl.constexpr,  # patches per program (the dot's M)
    BLOCK_K: tl.constexpr,  # classes per program (the dot's N)
    BLOCK_D: tl.constexpr,  # features per loop step (the dot's K)
):
    pid = tl.program_id(0)
    # Tile counts by integer arithmetic: each tl.* jit helper (tl.cdiv) costs milliseconds per call under the
    # interpreter. K tiles fastest: the programs sharing an N tile of patches run together and read it from L2.
    num_k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    num_n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_k = pid % num_k_tiles
    pid_n = (pid // num_k_tiles) % num_n_tiles
    b = (pid // (num_k_tiles * num_n_tiles)).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_k = offs_k < K
    # (BLOCK_N, BLOCK_D) patch tile and (BLOCK_D, BLOCK_K) transposed class tile, advanced along D.
    p_ptrs = (patches_ptr + b * stride_pb + offs_n[:, None].to(tl.int64) * stride_pn
              + offs_d[None, :].to(tl.int64) * stride_pd)
    c_ptrs = (classes_ptr + b * stride_cb + offs_k[None, :].to(tl.int64) * stride_ck
              + offs_d[:, None].to(tl.int64) * stride_cd)
    p_step = tl.full((), BLOCK_D, tl.int64) * stride_pd
    c_step = tl.full((), BLOCK_D, tl.int64) * stride_cd

    raw = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    # Row sums of squares, reduced every step: elementwise (BLOCK_N, BLOCK_D) accumulators would cost as many
    # registers as the dot's accumulator and spill (seen in ptxas's report for sm_90).
    sq_p = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    sq_c = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        mask_d = offs_d < D - d0
        p = tl.load(p_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        c = tl.load(c_ptrs, mask=mask_d[:, None] & mask_k[None, :], other=0.0)
        p_acc = p.to(ACC_DTYPE)
        c_acc = c.to(ACC_DTYPE)
        sq_p += tl.sum(p_acc * p_acc, axis=1)
        sq_c += tl.sum(c_acc * c_acc, axis=0)
        raw = tl.dot(p.to(DOT_DTYPE), c.to(DOT_DTYPE), raw, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        p_ptrs += p_step
        c_ptrs += c_step

    scale = _scale(scale_ptr, scale_hi, scale_lo, ACC_DTYPE, SCALE_TENSOR)
    norm_p = tl.sqrt(sq_p)
    norm_c = tl.sqrt(sq_c)
    # tl.where materialises EPS in the norms' dtype (tl.maximum would round a Python float to fp32).
    inv_p = 1.0 / tl.where(norm_p >= EPS, norm_p, EPS)
    inv_c = 1.0 / tl.where(norm_c >= EPS, norm_c, EPS)
    masks = raw * (inv_p * scale)[:, None] * inv_c[None, :]
    out = masks_ptr + b * K * N + offs_k[None, :].to(tl.int64) * N + offs_n[:, None]
    tl.store(out, masks.to(masks_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    tl.store(norm_p_ptr + b * N + offs_n, norm_p, mask=mask_n & (pid_k == 0))
    tl.store(norm_c_ptr + b * K + offs_k, norm_c, mask=mask_k & (pid_n == 0))


@triton.jit
def _input_grad_tile(
    tile,  # index of this program among the programs of this gradient
    grad_ptr,  # dM seen as (B, R, J) through the strides below: R = N, J = K for dp; R = K, J = N for dc
    masks_ptr,  # (B, K, N) contiguous saved masks, seen as (B, R, J) through stride_mr, stride_mj
    x_ptr,  # (B, R, D) any strides: the input whose gradient this computes
    y_ptr,  # (B, J, D) any strides: the other input
    norm_x_ptr,  # (B, R) contiguous: ‖x‖ from the forward
    norm_y_ptr,  # (B, J) contiguous: ‖y‖ from the forward
    scale_ptr,  # () the scale s when SCALE_TENSOR
    scale_hi,  # else s = scale_hi + scale_lo
    scale_lo,
    grad_x_ptr,  # (B, R, D) contiguous output dx, in x's dtype
    scale_partial_ptr,  # (programs,) out when SCALE_GRAD: this tile's share of ds
    R, J, D,  # rows of x, rows of y (the reduced axis), feature size
    stride_gb, stride_gr, stride_gj,  # dM strides, in the (B, R, J) view
    stride_mr, stride_mj,  # masks strides in the (R, J) view (its batch stride is R·J)
    stride_xb, stride_xr, stride_xd,  # x strides
    stride_yb, stride_yj, stride_yd,  # y strides
    EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "tf32x3" (fp32 inputs), "tf32" (16-bit inputs), "ieee" (fp64)
    ACC_DTYPE: tl.constexpr,
    SCALE_TENSOR: tl.constexpr,
    SCALE_GRAD: tl.constexpr,  # write this tile's share of ds = Σ x̂ · (Σ_j dM ŷ)
    BLOCK_R: tl.constexpr,  # rows of x per program (the dot's N)
    BLOCK_J: tl.constexpr,  # rows of y per loop step (the dot's K)
    BLOCK_D: tl.constexpr,  # features per program (the dot's M)
):
    num_d_tiles = (D + BLOCK_D - 1) // BLOCK_D
    num_r_tiles = (R + BLOCK_R - 1) // BLOCK_R
    # D tiles fastest: consecutive programs reuse the same dM and masks strips from L2.
    pid_d = tile % num_d_tiles
    pid_r = (tile // num_d_tiles) % num_r_tiles
    b = (tile // (num_d_tiles * num_r_tiles)).to(tl.int64)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_J)
    mask_r = offs_r < R
    mask_d = offs_d < D
    rows_r = offs_r[None, :].to(tl.int64)
    cols_j = offs_j[:, None].to(tl.int64)
    # (BLOCK_J, BLOCK_R) tiles of dM and masks, the (BLOCK_D, BLOCK_J) transposed tile of y; advanced along J.
    g_ptrs = grad_ptr + b * stride_gb + rows_r * stride_gr + cols_j * stride_gj
    m_ptrs = masks_ptr + b * R * J + rows_r * stride_mr + cols_j * stride_mj
    y_ptrs = (y_ptr + b * stride_yb + offs_d[:, None].to(tl.int64) * stride_yd
              + offs_j[None, :].to(tl.int64) * stride_yj)
    g_step = tl.full((), BLOCK_J, tl.int64) * stride_gj
    m_step = tl.full((), BLOCK_J, tl.int64) * stride_mj
    y_step = tl.full((), BLOCK_J, tl.int64) * stride_yj

    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=ACC_DTYPE)  # (Σ_j dM[r, j] ŷ_j[d])ᵀ
    sigma_x = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)  # Σ_j dM·masks
    for j0 in range(0, J, BLOCK_J):
        mask_j = offs_j < J - j0
        grad_mask = mask_j[:, None] & mask_r[None, :]
        g = tl.load(g_ptrs, mask=grad_mask, other=0.0).to(ACC_DTYPE)
        m = tl.load(m_ptrs, mask=grad_mask, other=0.0).to(ACC_DTYPE)
        sigma_x += tl.sum(g * m, axis=0)
        y = tl.load(y_ptrs, mask=mask_d[:, None] & mask_j[None, :], other=0.0).to(ACC_DTYPE)
        norm_y = tl.load(norm_y_ptr + b * J + j0 + offs_j, mask=mask_j, other=0.0)
        inv_y = 1.0 / tl.where(norm_y >= EPS, norm_y, EPS)
        acc = tl.dot(y * inv_y[None, :], g, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        g_ptrs += g_step
        m_ptrs += m_step
        y_ptrs += y_step

    norm_x = tl.load(norm_x_ptr + b * R + offs_r, mask=mask_r, other=0.0)
    inv_x = 1.0 / tl.where(norm_x >= EPS, norm_x, EPS)
    x = tl.load(
        x_ptr + b * stride_xb + rows_r * stride_xr + offs_d[:, None].to(tl.int64) * stride_xd,
        mask=mask_d[:, None] & mask_r[None, :],
        other=0.0,
    ).to(ACC_DTYPE)
    scale = _scale(scale_ptr, scale_hi, scale_lo, ACC_DTYPE, SCALE_TENSOR)
    # dx = s·acc·ι_x − x·ι_x²·σ_x, the projection only where the clamp is inactive (‖x‖ ≥ eps).
    projection = tl.where(norm_x >= EPS, sigma_x * inv_x * inv_x, 0.0)
    grad_x = acc * (scale * inv_x)[None, :] - x * projection[None, :]
    out = grad_x_ptr + b * R * D + rows_r * D + offs_d[:, None]
    tl.store(out, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_r[None, :])
    if SCALE_GRAD:  # Σ over the tile of x̂ · acc: masked lanes hold x = 0
        tl.store(scale_partial_ptr + tile, tl.sum(tl.sum(x * acc, axis=0) * inv_x, axis=0))


@triton.jit
def _cosine_mask_bwd_kernel(
    grad_ptr,  # (B, K, N) upstream gradient dM, any strides (0 for an expanded `.sum()` gradient)
    masks_ptr,  # (B, K, N) contiguous saved masks (s·raw)
    patches_ptr,  # (B, N, D) any strides
    classes_ptr,  # (B, K, D) any strides
    norm_p_ptr,  # (B, N) ‖p‖ from the forward
    norm_c_ptr,  # (B, K) ‖c‖ from the forward
    scale_ptr,  # () the scale s when SCALE_TENSOR
    scale_hi,  # else s = scale_hi + scale_lo
    scale_lo,
    grad_patches_ptr,  # (B, N, D) contiguous output dp
    grad_classes_ptr,  # (B, K, D) contiguous output dc
    scale_partial_ptr,  # (dc programs,) out when SCALE_GRAD: per-program shares of ds
    patch_programs,  # the first patch_programs programs compute dp, the rest dc
    N, K, D,
    stride_gb, stride_gk, stride_gn,
    stride_pb, stride_pn, stride_pd,
    stride_cb, stride_ck, stride_cd,
    EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    SCALE_TENSOR: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    P_BLOCK_R: tl.constexpr, P_BLOCK_J: tl.constexpr, P_BLOCK_D: tl.constexpr,  # dp tiles (R = N, J = K)
    C_BLOCK_R: tl.constexpr, C_BLOCK_J: tl.constexpr, C_BLOCK_D: tl.constexpr,  # dc tiles (R = K, J = N)
):
    pid = tl.program_id(0)
    if pid < patch_programs:
        _input_grad_tile(
            pid, grad_ptr, masks_ptr, patches_ptr, classes_ptr, norm_p_ptr, norm_c_ptr, scale_ptr, scale_hi,
            scale_lo, grad_patches_ptr, scale_partial_ptr, N, K, D,
            stride_gb, stride_gn, stride_gk, 1, N,
            stride_pb, stride_pn, stride_pd, stride_cb, stride_ck, stride_cd,
            EPS, DOT_PRECISION, ACC_DTYPE, SCALE_TENSOR, False, P_BLOCK_R, P_BLOCK_J, P_BLOCK_D,
        )
    else:
        _input_grad_tile(
            pid - patch_programs, grad_ptr, masks_ptr, classes_ptr, patches_ptr, norm_c_ptr, norm_p_ptr,
            scale_ptr, scale_hi, scale_lo, grad_classes_ptr, scale_partial_ptr, K, N, D,
            stride_gb, stride_gk, stride_gn, N, 1,
            stride_cb, stride_ck, stride_cd, stride_pb, stride_pn, stride_pd,
            EPS, DOT_PRECISION, ACC_DTYPE, SCALE_TENSOR, SCALE_GRAD, C_BLOCK_R, C_BLOCK_J, C_BLOCK_D,
        )


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _grown_tile(other_programs: int, size: int, target: int, candidates=(128, 64, 32, 16)) -> int:
    """The largest tile of ``size`` (among ``candidates``, largest first, none wider than ``size`` needs)
    that still gives ≥ ``target`` programs together with ``other_programs`` (the grid's other axes); the
    smallest when none does."""
    cap = max(candidates[-1], triton.next_power_of_2(max(size, 1)))
    fitting = [tile for tile in candidates if tile <= cap]
    for tile in fitting:
        if other_programs * triton.cdiv(size, tile) >= target:
            return tile
    return fitting[-1]


def forward_tiles(batch: int, num_patches: int, num_classes: int, dim: int, target: Target) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D) of the forward launch (see the module docstring, "Tiles and grids")."""
    block_k = pow2_tile(num_classes, max_padding=MAX_PADDING)
    programs = PROGRAMS_PER_SM * target.multiprocessors
    block_n = _grown_tile(batch * triton.cdiv(num_classes, block_k), num_patches, programs)
    block_d = min(32, max(16, triton.next_power_of_2(max(dim, 1))))
    return block_n, block_k, block_d


def input_grad_tiles(batch: int, rows: int, reduced: int, dim: int, target: Target) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_J, BLOCK_D) of one input gradient: rows of x, the reduced rows of y, features."""
    block_r = pow2_tile(rows, max_padding=MAX_PADDING)
    # The reduced rows are the dot's K: Triton 3.6 (the GPU image's) needs K ≥ 16 for fp32 dots (3.8: 8).
    block_j = pow2_tile(reduced, candidates=(32, 16), max_padding=MAX_PADDING)
    programs = PROGRAMS_PER_SM * target.multiprocessors
    block_d = _grown_tile(batch * triton.cdiv(rows, block_r), dim, programs, candidates=(64, 32, 16))
    return block_r, block_j, block_d


def _forward_dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit tiles enter the forward dot as they are (exact products, tensor cores), except bf16 under the
    interpreter, whose bf16 dot is unreliable (``utils.UPCAST_BF16_DOTS``); everything else is dotted in the
    accumulation dtype."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not utils.UPCAST_BF16_DOTS):
        return dtype
    return compute_dtype(dtype)


def _precision(dtype: torch.dtype) -> str:
    """tf32x3 for fp32 inputs, IEEE for fp64; "tf32" for 16-bit inputs, which only their fp32 backward dots
    use (a 16-bit forward dot ignores it)."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "tf32x3"
    return "tf32"


def _scale_args(scale: torch.Tensor | None, scale_value: float, like: torch.Tensor) -> tuple:
    """(pointer, hi, lo) kernel arguments of the scale: a 0-dim tensor, or a Python float in two fp32 halves."""
    hi, lo = split_fp32(float(scale_value))
    return (scale if scale is not None else like), hi, lo


def cosine_mask_forward(
    patches: torch.Tensor,
    classes: torch.Tensor,
    scale: torch.Tensor | None,
    scale_value: float,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks (B, K, N) in out_dtype, ‖p‖ (B, N), ‖c‖ (B, K)) for patches (B, N, D), classes (B, K, D).

    masks = s · ĉ p̂ᵀ with s the 0-dim tensor ``scale``, or ``scale_value`` when it is None; the norms are
    in the accumulation dtype (the backward's inputs).
    """
    batch, num_patches, dim = patches.shape
    num_classes = classes.shape[1]
    device = patches.device
    acc = compute_dtype(patches.dtype)
    masks = torch.empty((batch, num_classes, num_patches), dtype=out_dtype, device=device)
    if masks.numel() == 0:  # nothing to launch; the norms are still defined
        norm_p = torch.linalg.vector_norm(patches.to(acc), dim=-1)
        norm_c = torch.linalg.vector_norm(classes.to(acc), dim=-1)
        return masks, norm_p, norm_c
    norm_p = torch.empty((batch, num_patches), dtype=acc, device=device)
    norm_c = torch.empty((batch, num_classes), dtype=acc, device=device)
    block_n, block_k, block_d = forward_tiles(batch, num_patches, num_classes, dim, launch_target(device))
    grid = (batch * triton.cdiv(num_patches, block_n) * triton.cdiv(num_classes, block_k),)
    with device_guard(device):  # launch on the tensors' GPU, not the current one
        _cosine_mask_fwd_kernel[grid](
            patches, classes, *_scale_args(scale, scale_value, patches), masks, norm_p, norm_c,
            num_patches, num_classes, dim,
            *patches.stride(), *classes.stride(),
            EPS=eps,
            DOT_DTYPE=tl_dtype(_forward_dot_dtype(patches.dtype)),
            DOT_PRECISION=_precision(patches.dtype),
            ACC_DTYPE=tl_dtype(acc),
            SCALE_TENSOR=scale is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
            num_warps=num_warps(block_n * block_d, VALUES_PER_THREAD),
        )  # fmt: skip
    return masks, norm_p, norm_c


def cosine_mask_backward(
    grad: torch.Tensor,
    patches: torch.Tensor,
    classes: torch.Tensor,
    scale: torch.Tensor | None,
    scale_value: float,
    masks: torch.Tensor,
    norm_p: torch.Tensor,
    norm_c: torch.Tensor,
    eps: float,
    need_patches: bool,
    need_classes: bool,
    need_scale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d patches, d classes, d scale) for the upstream gradient ``grad`` (B, K, N), any strides.

    ``masks`` (B, K, N) contiguous and the norms are the forward's; the scale is ``scale`` (a 0-dim tensor)
    or ``scale_value`` when that is None. d patches / d classes are contiguous, in the inputs' dtype, or
    empty (0,) tensors when not needed; d scale is a 0-dim tensor in the accumulation dtype (the caller
    casts it to the scale's dtype), or an empty (0,) tensor when not needed.
    """
    batch, num_patches, dim = patches.shape
    num_classes = classes.shape[1]
    device = patches.device
    acc = compute_dtype(patches.dtype)
    grad_patches = torch.empty(patches.shape if need_patches else (0,), dtype=patches.dtype, device=device)
    # ds is formed from the class-gradient programs, so they also run when only the scale needs a gradient.
    run_classes = need_classes or need_scale
    grad_classes = torch.empty(classes.shape if run_classes else (0,), dtype=classes.dtype, device=device)
    if batch * num_patches * num_classes * dim == 0 or not (need_patches or run_classes):
        # No mask entry, or only zero vectors (D = 0): nothing flows back.
        grad_classes = grad_classes if need_classes else grad_classes.new_empty((0,))
        grad_scale = torch.zeros((), dtype=acc, device=device) if need_scale else torch.empty((0,), device=device)
        return grad_patches.zero_(), grad_classes.zero_(), grad_scale

    target = launch_target(device)
    p_tiles = input_grad_tiles(batch, num_patches, num_classes, dim, target)
    c_tiles = input_grad_tiles(batch, num_classes, num_patches, dim, target)
    patch_programs = batch * triton.cdiv(num_patches, p_tiles[0]) * triton.cdiv(dim, p_tiles[2]) if need_patches else 0
    class_programs = batch * triton.cdiv(num_classes, c_tiles[0]) * triton.cdiv(dim, c_tiles[2]) if run_classes else 0
    scale_partials = torch.empty((class_programs if need_scale else 1,), dtype=acc, device=device)
    largest_tile = max(p_tiles[0] * p_tiles[2], c_tiles[0] * c_tiles[2])
    with device_guard(device):  # launch on the tensors' GPU, not the current one
        _cosine_mask_bwd_kernel[(patch_programs + class_programs,)](
            grad, masks, patches, classes, norm_p, norm_c, *_scale_args(scale, scale_value, patches),
            # an unrequested gradient's pointer is never dereferenced (its programs are not in the grid)
            grad_patches if need_patches else grad_classes,
            grad_classes if run_classes else grad_patches,
            scale_partials, patch_programs,
            num_patches, num_classes, dim,
            *grad.stride(), *patches.stride(), *classes.stride(),
            EPS=eps,
            DOT_PRECISION=_precision(patches.dtype),
            ACC_DTYPE=tl_dtype(acc),
            SCALE_TENSOR=scale is not None,
            SCALE_GRAD=need_scale,
            P_BLOCK_R=p_tiles[0], P_BLOCK_J=p_tiles[1], P_BLOCK_D=p_tiles[2],
            C_BLOCK_R=c_tiles[0], C_BLOCK_J=c_tiles[1], C_BLOCK_D=c_tiles[2],
            num_warps=num_warps(largest_tile, VALUES_PER_THREAD),
        )  # fmt: skip
    # Fixed-order sum of the per-program shares: deterministic, no atomics.
    grad_scale = scale_partials.sum() if need_scale else torch.empty((0,), dtype=acc, device=device)
    if not need_classes:
        grad_classes = grad_classes.new_empty((0,))
    return grad_patches, grad_classes, grad_scale
