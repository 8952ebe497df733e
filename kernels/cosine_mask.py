"""Triton kernels of cosine_mask: the normalised patch/class similarity masks of the mask-transformer decoder.

Forward
-------
patches P (B, N, D), classes C (B, K, D), a scalar scale s. With x̂ = x / max(‖x‖₂, eps):

    masks[b, k, n] = s · ⟨ĉ[b, k], p̂[b, n]⟩ = s · ⟨c[b, k], p[b, n]⟩ · ι_c[b, k] · ι_p[b, n],
    ι_x = 1 / max(‖x‖, eps).

So the normalisation never has to be materialised: one program per (b, K tile, N tile) walks D in blocks,
accumulates the raw dot products C·Pᵀ with `tl.dot` and, from the very same loaded tiles, the squared norms
of its class rows and patch rows ("norms for free", no extra pass); the epilogue multiplies by
s·ι_c[:, None]·ι_p[None, :] and stores the (K, N) tile straight into the contiguous (B, K, N) output, so
`masks.view(B, K, h, w)` costs nothing.

Backward (the VJP)
------------------
Write raw[k, n] = ⟨ĉ_k, p̂_n⟩ (so masks = s·raw) and G = s·dM for the upstream gradient dM (B, K, N). The
bilinear part gives the gradients with respect to the normalised vectors

    dp̂_n = Σ_k G[k, n] ĉ_k,        dĉ_k = Σ_n G[k, n] p̂_n,        ds = Σ_{b,k,n} dM · raw.

Through x̂ = x / max(‖x‖, eps): when ‖x‖ ≥ eps, x̂ = x/‖x‖ has Jacobian (I − x̂x̂ᵀ)/‖x‖; when ‖x‖ < eps the
clamp is constant, x̂ = x/eps, and the Jacobian is I/eps (torch's clamp_min passes the gradient at
‖x‖ = eps exactly, hence ≥). Both cases in one formula:

    dx = (dx̂ − x̂ · ⟨x̂, dx̂⟩ · [‖x‖ ≥ eps]) · ι_x.

The row dot products need no full row of dx̂: ⟨p̂_n, dp̂_n⟩ = s · Σ_k dM[k, n] raw[k, n] =: s·σ_p[n] and
⟨ĉ_k, dĉ_k⟩ = s · Σ_n dM[k, n] raw[k, n] =: s·σ_c[k], and ds = Σ_k σ_c[k]. Hence

    dp_n = s · (Σ_k dM[k, n] ĉ_k − p̂_n σ_p[n] [‖p_n‖ ≥ eps]) · ι_p[n]
    dc_k = s · (Σ_n dM[k, n] p̂_n − ĉ_k σ_c[k] [‖c_k‖ ≥ eps]) · ι_c[k].

Three launches, no atomics (deterministic):
1. `_backward_stats_kernel`, one program per (b, N tile): recomputes raw tile by tile exactly like the forward
   (norms again for free) — one extra GEMM, in exchange for saving nothing but the inputs — and writes the
   norms ‖p‖ (B, N), ‖c‖ (B, K), σ_p (B, N) complete (the program loops over all of K) and σ_c as per-N-tile
   partial sums (B, N tiles, K), reduced afterwards by a fixed-order torch `.sum` (also giving ds).
2. `_backward_input_kernel` for dp: one program per (b, N tile, D tile) accumulates Σ_k dM[k, n] ĉ_k over
   K blocks (ĉ = c·ι_c formed on the fly from the norms of step 1) and applies the projection in the epilogue.
3. the same kernel for dc, with the roles of patches and classes swapped (dMᵀ is dM with its strides swapped).
No normalised copy of patches or classes is ever materialised; every intermediate is O(B·(N + K)).

Precision and tensor cores. Accumulation is fp32 (fp64 for fp64 inputs). fp32 dots run with
input_precision="ieee" (no TF32) so fp32 results match the float64 reference to ~1e-6. For fp16/bf16 inputs
the forward and stats dots take the 16-bit tiles as they are: products of 16-bit numbers are exact in fp32,
so tensor cores give fp32-exact results. In the input-gradient dots dM is 16-bit (exact) but ŷ = y·ι_y is an
fp32 value: it is split into hi + lo 16-bit parts (ŷ ≈ hi + lo to ~2^-22 for fp16, ~2^-16 for bf16) and
two tensor-core dots are accumulated, which keeps near-fp32 accuracy at tensor-core speed. Under Triton's
interpreter bf16 `tl.dot` is unreliable, so there bf16 tiles are upcast and dotted in fp32 (same result).

Limits: fp32 inputs whose squared row norms overflow fp32 (‖x‖ ≳ 1e19) give inf norms, like the reference.
Offsets are int64 throughout (outputs beyond 2^31 elements work); every load and store is masked; inputs
and dM may have any strides, including 0 (an expanded `.sum()` gradient, classes expanded over the batch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import INTERPRET
from . import device_guard

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# σ_c partials are written per N tile, so the stats kernel's N tile is fixed (not autotuned): the launcher
# must know the number of partials before the launch.
_STATS_BLOCK_N = 64


def _configs(interpreted: dict, cuda: list[tuple[dict, int, int]]) -> list[triton.Config]:
    """One config under the interpreter (autotuning more than one fails there), a few on CUDA.

    The interpreter's tiles are 64 wide: its tl.dot is numpy's matmul, which turns ~1000× slower (threaded
    BLAS) on a busy CPU once a product exceeds 64·64·64 multiply-adds.
    """
    if INTERPRET:
        return [triton.Config(interpreted, num_warps=4, num_stages=1)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in cuda]


# Forward: K tiles of 64-128 cover the usual class counts (≤ 150) in one or two tiles; K is the fastest
# grid axis, so the programs sharing an N tile of patches run together and read it from L2.
_FORWARD_CONFIGS = _configs(
    dict(BLOCK_K=64, BLOCK_N=64, BLOCK_D=64),
    [
        (dict(BLOCK_K=64, BLOCK_N=64, BLOCK_D=32), 4, 3),
        (dict(BLOCK_K=128, BLOCK_N=64, BLOCK_D=32), 4, 3),
        (dict(BLOCK_K=64, BLOCK_N=128, BLOCK_D=32), 4, 3),
        (dict(BLOCK_K=128, BLOCK_N=128, BLOCK_D=32), 8, 3),
    ],
)
_STATS_CONFIGS = _configs(
    dict(BLOCK_K=64, BLOCK_D=64),
    [
        (dict(BLOCK_K=64, BLOCK_D=32), 4, 3),
        (dict(BLOCK_K=128, BLOCK_D=32), 4, 3),
        (dict(BLOCK_K=128, BLOCK_D=64), 8, 3),
    ],
)
_INPUT_GRAD_CONFIGS = _configs(
    dict(BLOCK_R=64, BLOCK_J=64, BLOCK_D=64),
    [
        (dict(BLOCK_R=64, BLOCK_J=32, BLOCK_D=64), 4, 3),
        (dict(BLOCK_R=64, BLOCK_J=64, BLOCK_D=128), 4, 3),
        (dict(BLOCK_R=128, BLOCK_J=32, BLOCK_D=64), 8, 3),
        (dict(BLOCK_R=128, BLOCK_J=64, BLOCK_D=128), 8, 3),
    ],
)


@triton.autotune(configs=_FORWARD_CONFIGS, key=["N", "K", "D"])
@triton.jit
def _forward_kernel(
    patches_ptr,  # (B, N, D) any strides
    classes_ptr,  # (B, K, D) any strides
    scale_ptr,  # () the scale s, any float dtype
    masks_ptr,  # (B, K, N) contiguous output, in the requested out_dtype
    N,  # number of patches
    K,  # number of classes
    D,  # feature size
    stride_pb, stride_pn, stride_pd,  # patches strides
    stride_cb, stride_ck, stride_cd,  # classes strides
    EPS: tl.constexpr,  # norm clamp x̂ = x / max(‖x‖, EPS); constexpr so fp64 sees it unrounded (a compile per eps)
    DOT_DTYPE: tl.constexpr,  # dtype the tiles enter tl.dot in (16-bit inputs as they are, else ACC_DTYPE)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32/fp64 dots (no TF32); the default for 16-bit tensor-core dots
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 inputs
    BLOCK_K: tl.constexpr,  # classes per program
    BLOCK_N: tl.constexpr,  # patches per program
    BLOCK_D: tl.constexpr,  # features per loop step
):
    pid = tl.program_id(0).to(tl.int64)
    # Tile counts by integer arithmetic: each tl.* jit helper (tl.cdiv) costs milliseconds per call under the
    # interpreter.
    num_k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    num_n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_k = pid % num_k_tiles
    pid_n = (pid // num_k_tiles) % num_n_tiles
    b = pid // (num_k_tiles * num_n_tiles)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_k = offs_k < K
    mask_n = offs_n < N
    class_rows = classes_ptr + b * stride_cb + offs_k[:, None] * stride_ck
    patch_rows = patches_ptr + b * stride_pb + offs_n[:, None] * stride_pn

    raw = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC_DTYPE)
    # Squares are accumulated elementwise and reduced once after the loop: no cross-lane reduction per step.
    sq_c = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC_DTYPE)
    sq_p = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < D
        c = tl.load(class_rows + offs_d[None, :] * stride_cd, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        p = tl.load(patch_rows + offs_d[None, :] * stride_pd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        c_acc = c.to(ACC_DTYPE)
        p_acc = p.to(ACC_DTYPE)
        sq_c += c_acc * c_acc
        sq_p += p_acc * p_acc
        raw = tl.dot(c.to(DOT_DTYPE), tl.trans(p.to(DOT_DTYPE)), raw, input_precision=DOT_PRECISION)

    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    norm_c = tl.sqrt(tl.sum(sq_c, axis=1))
    norm_p = tl.sqrt(tl.sum(sq_p, axis=1))
    # tl.where materialises EPS in the norms' dtype (tl.maximum would round a Python float to fp32).
    inv_c = 1.0 / tl.where(norm_c >= EPS, norm_c, EPS)
    inv_p = 1.0 / tl.where(norm_p >= EPS, norm_p, EPS)
    masks = raw * (inv_c * scale)[:, None] * inv_p[None, :]
    out = masks_ptr + b * K * N + offs_k[:, None] * N + offs_n[None, :]
    tl.store(out, masks.to(masks_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


@triton.autotune(configs=_STATS_CONFIGS, key=["N", "K", "D"])
@triton.jit
def _backward_stats_kernel(
    grad_ptr,  # (B, K, N) upstream gradient dM, any strides (0 for an expanded `.sum()` gradient)
    patches_ptr,  # (B, N, D) any strides
    classes_ptr,  # (B, K, D) any strides
    norm_p_ptr,  # (B, N) out: ‖p[b, n]‖
    norm_c_ptr,  # (B, K) out: ‖c[b, k]‖, written by the programs of the first N tile
    sigma_p_ptr,  # (B, N) out: σ_p[b, n] = Σ_k dM[b, k, n] raw[b, k, n]
    sigma_c_partial_ptr,  # (B, cdiv(N, BLOCK_N), K) out: Σ over the tile's n of dM[b, k, n] raw[b, k, n]
    N, K, D,  # sizes as in the forward
    stride_gb, stride_gk, stride_gn,  # dM strides
    stride_pb, stride_pn, stride_pd,  # patches strides
    stride_cb, stride_ck, stride_cd,  # classes strides
    EPS: tl.constexpr,  # norm clamp, as in the forward
    DOT_DTYPE: tl.constexpr,  # as in the forward
    DOT_PRECISION: tl.constexpr,  # as in the forward
    ACC_DTYPE: tl.constexpr,  # as in the forward
    BLOCK_N: tl.constexpr,  # patches per program (fixed by the launcher: it sizes the σ_c partials)
    BLOCK_K: tl.constexpr,  # classes per inner tile; the program loops over all of K
    BLOCK_D: tl.constexpr,  # features per loop step
):
    pid = tl.program_id(0).to(tl.int64)
    num_n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % num_n_tiles
    b = pid // num_n_tiles

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < N
    patch_rows = patches_ptr + b * stride_pb + offs_n[:, None] * stride_pn

    sigma_p = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    norm_p = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        class_rows = classes_ptr + b * stride_cb + offs_k[:, None] * stride_ck
        raw = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC_DTYPE)
        sq_c = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC_DTYPE)
        # The patch norms are recomputed for every K tile (a few FMAs on tiles already loaded for the dot)
        # rather than in a separate pass over the patches.
        sq_p = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask_d = offs_d < D
            c = tl.load(class_rows + offs_d[None, :] * stride_cd, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            p = tl.load(patch_rows + offs_d[None, :] * stride_pd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            c_acc = c.to(ACC_DTYPE)
            p_acc = p.to(ACC_DTYPE)
            sq_c += c_acc * c_acc
            sq_p += p_acc * p_acc
            raw = tl.dot(c.to(DOT_DTYPE), tl.trans(p.to(DOT_DTYPE)), raw, input_precision=DOT_PRECISION)
        norm_c = tl.sqrt(tl.sum(sq_c, axis=1))
        norm_p = tl.sqrt(tl.sum(sq_p, axis=1))
        inv_c = 1.0 / tl.where(norm_c >= EPS, norm_c, EPS)
        inv_p = 1.0 / tl.where(norm_p >= EPS, norm_p, EPS)
        raw = raw * inv_c[:, None] * inv_p[None, :]
        grad = tl.load(
            grad_ptr + b * stride_gb + offs_k[:, None] * stride_gk + offs_n[None, :] * stride_gn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        grad_raw = grad * raw
        sigma_p += tl.sum(grad_raw, axis=0)
        tl.store(sigma_c_partial_ptr + (b * num_n_tiles + pid_n) * K + offs_k, tl.sum(grad_raw, axis=1), mask=mask_k)
        tl.store(norm_c_ptr + b * K + offs_k, norm_c, mask=mask_k & (pid_n == 0))
    tl.store(norm_p_ptr + b * N + offs_n, norm_p, mask=mask_n)
    tl.store(sigma_p_ptr + b * N + offs_n, sigma_p, mask=mask_n)


@triton.autotune(configs=_INPUT_GRAD_CONFIGS, key=["R", "J", "D"])
@triton.jit
def _backward_input_kernel(
    grad_ptr,  # dM seen as (B, R, J) through the strides below: R = N, J = K for dp; R = K, J = N for dc
    x_ptr,  # (B, R, D) any strides: the input whose gradient this computes
    y_ptr,  # (B, J, D) any strides: the other input
    norm_x_ptr,  # (B, R) contiguous: ‖x‖ from the stats kernel
    norm_y_ptr,  # (B, J) contiguous: ‖y‖ from the stats kernel
    sigma_x_ptr,  # (B, R) contiguous: σ_x[r] = Σ_j dM[r, j] raw[r, j]
    scale_ptr,  # () the scale s, any float dtype
    grad_x_ptr,  # (B, R, D) contiguous output dx, in the inputs' dtype
    R, J, D,  # rows of x, rows of y (the reduced axis), feature size
    stride_gb, stride_gr, stride_gj,  # dM strides, in the (B, R, J) view
    stride_xb, stride_xr, stride_xd,  # x strides
    stride_yb, stride_yj, stride_yd,  # y strides
    EPS: tl.constexpr,  # norm clamp, as in the forward
    DOT_DTYPE: tl.constexpr,  # 16-bit: split ŷ into hi + lo tensor-core dots; otherwise ACC_DTYPE
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 inputs
    SPLIT_DOT: tl.constexpr,  # DOT_DTYPE is 16-bit (and dM is in it, so it enters the dot exactly)
    BLOCK_R: tl.constexpr,  # rows of x per program
    BLOCK_J: tl.constexpr,  # rows of y per loop step
    BLOCK_D: tl.constexpr,  # features per program
):
    pid = tl.program_id(0).to(tl.int64)
    num_d_tiles = (D + BLOCK_D - 1) // BLOCK_D
    num_r_tiles = (R + BLOCK_R - 1) // BLOCK_R
    # D tiles fastest: consecutive programs reuse the same dM strip from L2.
    pid_d = pid % num_d_tiles
    pid_r = (pid // num_d_tiles) % num_r_tiles
    b = pid // (num_d_tiles * num_r_tiles)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_r = offs_r < R
    mask_d = offs_d < D
    grad_rows = grad_ptr + b * stride_gb + offs_r[:, None] * stride_gr

    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
    for j0 in range(0, J, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        mask_j = offs_j < J
        grad = tl.load(grad_rows + offs_j[None, :] * stride_gj, mask=mask_r[:, None] & mask_j[None, :], other=0.0)
        y = tl.load(
            y_ptr + b * stride_yb + offs_j[:, None] * stride_yj + offs_d[None, :] * stride_yd,
            mask=mask_j[:, None] & mask_d[None, :],
            other=0.0,
        )
        norm_y = tl.load(norm_y_ptr + b * J + offs_j, mask=mask_j, other=0.0)
        inv_y = 1.0 / tl.where(norm_y >= EPS, norm_y, EPS)
        y_hat = y.to(ACC_DTYPE) * inv_y[:, None]
        if SPLIT_DOT:
            grad_dot = grad.to(DOT_DTYPE)
            y_hi = y_hat.to(DOT_DTYPE)
            y_lo = (y_hat - y_hi.to(ACC_DTYPE)).to(DOT_DTYPE)
            acc = tl.dot(grad_dot, y_hi, acc)
            acc = tl.dot(grad_dot, y_lo, acc)
        else:
            acc = tl.dot(grad.to(ACC_DTYPE), y_hat, acc, input_precision="ieee")

    norm_x = tl.load(norm_x_ptr + b * R + offs_r, mask=mask_r, other=0.0)
    sigma_x = tl.load(sigma_x_ptr + b * R + offs_r, mask=mask_r, other=0.0)
    inv_x = 1.0 / tl.where(norm_x >= EPS, norm_x, EPS)
    # The tangential projection applies only where the clamp is inactive (‖x‖ ≥ eps).
    projection = tl.where(norm_x >= EPS, sigma_x * inv_x, 0.0)
    x = tl.load(
        x_ptr + b * stride_xb + offs_r[:, None] * stride_xr + offs_d[None, :] * stride_xd,
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    ).to(ACC_DTYPE)
    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    grad_x = (acc - x * projection[:, None]) * (inv_x * scale)[:, None]
    out = grad_x_ptr + b * R * D + offs_r[:, None] * D + offs_d[None, :]
    tl.store(out, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit tiles enter tl.dot as they are (exact products, tensor cores), except bf16 under the
    interpreter, whose bf16 dot is unreliable; everything else is dotted in the accumulation dtype."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not INTERPRET):
        return dtype
    return _acc_dtype(dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32/fp64 dots keep fp32 parity with the reference; 16-bit dots are exact at the default setting."""
    return "ieee" if _dot_dtype(dtype) == _acc_dtype(dtype) else "tf32"


def cosine_mask_forward(
    patches: torch.Tensor, classes: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """masks (B, K, N) = scale · ĉ p̂ᵀ in out_dtype for patches (B, N, D), classes (B, K, D), scale 0-dim."""
    batch, num_patches, dim = patches.shape
    num_classes = classes.shape[1]
    masks = torch.empty((batch, num_classes, num_patches), dtype=out_dtype, device=patches.device)
    if masks.numel() == 0:
        return masks

    def grid(meta):
        return (batch * triton.cdiv(num_patches, meta["BLOCK_N"]) * triton.cdiv(num_classes, meta["BLOCK_K"]),)

    with device_guard(patches.device):  # launch on the tensors' GPU, not the current one
        _forward_kernel[grid](
            patches, classes, scale, masks,
            num_patches, num_classes, dim,
            *patches.stride(), *classes.stride(),
            EPS=eps,
            DOT_DTYPE=_TL_DTYPE[_dot_dtype(patches.dtype)],
            DOT_PRECISION=_dot_precision(patches.dtype),
            ACC_DTYPE=_TL_DTYPE[_acc_dtype(patches.dtype)],
        )
    return masks


def cosine_mask_backward(
    grad: torch.Tensor,
    patches: torch.Tensor,
    classes: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    need_patches: bool,
    need_classes: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d patches, d classes, d scale) for the upstream gradient ``grad`` (B, K, N), any strides.

    d patches / d classes are contiguous, in the inputs' dtype, or empty (0,) tensors when not needed;
    d scale is a 0-dim tensor in the accumulation dtype (the caller casts it to the scale's dtype).
    """
    batch, num_patches, dim = patches.shape
    num_classes = classes.shape[1]
    device = patches.device
    acc_dtype = _acc_dtype(patches.dtype)
    dot_dtype = _dot_dtype(patches.dtype)
    grad_patches = torch.empty(patches.shape if need_patches else (0,), dtype=patches.dtype, device=device)
    grad_classes = torch.empty(classes.shape if need_classes else (0,), dtype=classes.dtype, device=device)
    if batch * num_patches * num_classes == 0:
        # No mask entries: nothing flows back.
        return grad_patches.zero_(), grad_classes.zero_(), torch.zeros((), dtype=acc_dtype, device=device)

    num_n_tiles = triton.cdiv(num_patches, _STATS_BLOCK_N)
    norm_p = torch.empty((batch, num_patches), dtype=acc_dtype, device=device)
    norm_c = torch.empty((batch, num_classes), dtype=acc_dtype, device=device)
    sigma_p = torch.empty((batch, num_patches), dtype=acc_dtype, device=device)
    sigma_c_partial = torch.empty((batch, num_n_tiles, num_classes), dtype=acc_dtype, device=device)
    with device_guard(device):  # launch on the tensors' GPU, not the current one
        _backward_stats_kernel[(batch * num_n_tiles,)](
            grad, patches, classes,
            norm_p, norm_c, sigma_p, sigma_c_partial,
            num_patches, num_classes, dim,
            *grad.stride(), *patches.stride(), *classes.stride(),
            EPS=eps,
            DOT_DTYPE=_TL_DTYPE[dot_dtype],
            DOT_PRECISION=_dot_precision(patches.dtype),
            ACC_DTYPE=_TL_DTYPE[acc_dtype],
            BLOCK_N=_STATS_BLOCK_N,
        )
    # Fixed-order reductions of the per-tile partials: deterministic, no atomics.
    sigma_c = sigma_c_partial.sum(dim=1)
    grad_scale = sigma_c.sum()

    # dM enters the split 16-bit dots exactly only when it has the inputs' dtype (always so under autograd).
    split = dot_dtype != acc_dtype and grad.dtype == patches.dtype
    kernel_dot_dtype = _TL_DTYPE[dot_dtype if split else acc_dtype]
    stride_gb, stride_gk, stride_gn = grad.stride()

    def launch(x, y, norm_x, norm_y, sigma_x, grad_x, stride_gr, stride_gj):
        rows, other_rows = x.shape[1], y.shape[1]
        if grad_x.numel() == 0:
            return

        def grid(meta):
            return (batch * triton.cdiv(rows, meta["BLOCK_R"]) * triton.cdiv(dim, meta["BLOCK_D"]),)

        with device_guard(device):
            _backward_input_kernel[grid](
                grad, x, y, norm_x, norm_y, sigma_x, scale, grad_x,
                rows, other_rows, dim,
                stride_gb, stride_gr, stride_gj,
                *x.stride(), *y.stride(),
                EPS=eps,
                DOT_DTYPE=kernel_dot_dtype,
                ACC_DTYPE=_TL_DTYPE[acc_dtype],
                SPLIT_DOT=split,
            )

    if need_patches:
        launch(patches, classes, norm_p, norm_c, sigma_p, grad_patches, stride_gn, stride_gk)
    if need_classes:
        launch(classes, patches, norm_c, norm_p, sigma_c, grad_classes, stride_gk, stride_gn)
    return grad_patches, grad_classes, grad_scale
