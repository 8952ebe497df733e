"""Triton kernels of the segmentation head straight from patch-resolution masks: loss sums, their backward,
and PLOP's teacher statistics — none of them ever holds the (B, K, H, W) pixel logits.

Bilinear upsampling (align_corners=False, as F.interpolate) and its cells
--------------------------------------------------------------------------
Along one axis of input size n and output size N, output index d reads the input at

    src(d) = max((d + 0.5)·(n/N) − 0.5, 0),  i0 = ⌊src⌋,  i1 = min(i0 + 1, n − 1),  λ = src − i0,

computed in the accumulation dtype exactly as PyTorch does (scale n/N in that dtype), and the logit of class c
at pixel (y, x) of image b is, with top = m[y0,x0] + (m[y0,x1] − m[y0,x0])·λx and bottom likewise on row y1,

    z_c = top + (bottom − top)·λy.

i0 is monotone in d, so the outputs with i0 = I form one run, the *cell* I: [start(I), start(I + 1)), where
start(I) is the first d with i0(d) ≥ I (`_cell_starts`: the rational estimate ((2I + 1)·N − n) / 2n, then i0
evaluated exactly on eight candidates around it). A pixel tile inside one cell (Y, X) of rows × columns has
the same four corners for every pixel: per class, the four mask values are loaded once per tile, top and
(bottom − top) are (classes × columns) vectors, and z costs one multiply-add per class-pixel. No kernel
gathers per class-pixel. Every kernel walks cells: a program owns a band of BAND × BAND cells of one image
(the backward: also a chunk of classes), and inside a cell takes BLOCK_R × BLOCK_C pixel tiles, so a
(BLOCK_K, BLOCK_R, BLOCK_C) block of logits is formed at a time. Empty cells (down-sampling) are loops of
zero trips. The bands are a fixed number of cells (not chosen to fill the grid: a constant plan keeps each
kernel's work a sum of identical interior bands, which the performance ledger extrapolates exactly); at
the paper shapes (32² masks, 512² labels, batch 8) they give 512 forward programs and 1280 (K = 151) or
384 (K = 21) backward programs, ≥ 2 per SM of an H100/H200.

Forward: per-band sums (`_seg_head_loss_fwd_kernel`, grid (bands·B,))
-----------------------------------------------------------------
For each pixel tile the classes are swept in chunks of BLOCK_K with an online softmax: running max m and the
masses L_old = Σ_{c<num_old} e^{z_c−m}, L_new = Σ_{c≥num_old} e^{z_c−m} (rescaled by e^{m_old−m_new} when the
max grows; a chunk entirely of old or of new classes adds its whole sum to one mass). The label's logit
z_y is interpolated per pixel from the label's own four mask values (four loads per pixel, not a compare per
class-pixel), with the operations that formed z_c (the same rounding, up to the compiler's choice of
fused multiply-adds). Per pixel

    lse = m + log(L_old + L_new),  CE = lse − z_y,  P_new = L_new / (L_old + L_new),  P_old = L_old / (…),

P_old from its own mass (not 1 − P_new, which is pure rounding when the new classes hold all the mass).
Two label maps are read per pixel: y (``labels``, the CE targets) and d (``dice_labels``, the dice's masks).
A value outside [0, K) counts as ignore_index. With C_old / C_new = y counted and < / ≥ num_old, valid = d
counted, M_new = valid ∧ d ≥ num_old, M_old = valid ∧ d < num_old, the program writes eight sums over its
pixels to partials (B, bands, 8):

    [Σ CE·C_old, Σ CE·C_new, Σ M_old, Σ M_new, Σ P_new·M_new, Σ P_new·valid, Σ P_old·M_old, Σ P_old·valid]

and the per-pixel (lse, P_new, P_old) to pixel_stats (B, 3, H·W), saved for the backward (3·B·H·W values,
K× fewer than the logits). The launcher sums the partials over bands with torch (a fixed-order reduction:
deterministic, no atomics). Class weights, image weights, smooth, the CE mean and the dice are formed from
these (B, 8) sums by a few tiny torch ops in `incrementer_fast.ops.seg_head`, so autograd differentiates
that combination and hands the kernels the gradient of the sums, g (B, 8).

Backward (VJP of the sums): separable, one axis contracted per step, in registers
--------------------------------------------------------------------------------
Only the CE sums and the four probability sums depend on the logits (the counts do not). For a pixel of
image b with g = g[b],

    ∂(Σ CE·M)/∂z_c = M·(p_c − [c = y]),
    ∂P_new/∂z_c = p_c·P_old for c ≥ num_old, −p_c·P_new for c < num_old,   ∂P_old/∂z_c = −∂P_new/∂z_c,

(the forms without cancellation, using P_new + P_old = 1), so with G_ce = g0·C_old + g1·C_new and
G_p = g4·M_new + g5·valid − g6·M_old − g7·valid,

    dz_c = p_c·(G_ce + G_p·(P_old if c ≥ num_old else −P_new)) − G_ce·[c = y],   p_c = e^{z_c − lse},

which needs only z_c and the saved per-pixel stats. The gradient of the masks is the transpose of the
interpolation: dm[c,Y,X] = Σ_{y,x} Ay[y,Y]·Ax[x,X]·dz_c(y,x), where row y gives weight 1−λy to its y0 and λy
to its y1 (both to y0 at the last row, where y1 = y0), and likewise the columns. A scatter from pixels to
their four corners would need float atomics (non-deterministic order); instead a program owns the outputs
(class chunk, BAND × BAND cells) and *gathers* what reaches them, walking its cells column by column
(`_seg_head_loss_bwd_kernel`):

* a pixel tile of cell (Y, X) contracts its columns first: per class and tile row, Σ_x dz·(1−λx) goes to
  column X and Σ_x dz·λx to column X + 1 (one multiply and two adds per class-pixel);
* then its rows: per class, the tile rows' sums weighted by 1−λy (reaching row Y) and by λy (reaching row
  Y + 1) are added up over the cell, and once per cell added onto those two of the band's output rows
  (classes × BAND accumulators): a few operations per class and tile row, none per pixel;
* after the last cell of column X, column X's gradient is its (1−λx) part plus the λx part carried from
  column X − 1 (both parts at the last column, where x1 = x0), written once; the λx part is carried on.

A band also walks the ring of cells just above and left of it (their λ-parts reach its first row and column),
whose pixels the neighbouring bands form too: each pixel's dz is formed (BAND + 1)²/BAND² times on average
(1.27× at BAND = 8), then contracted by λ-weighted sums, with no tl.dot and no weight that is structurally
zero. The gradient is written once, in order: bitwise deterministic (and the same for any band size).

PLOP teacher statistics (`_plop_teacher_kernel`: HISTOGRAM or pseudo-labels, grid (bands·B,))
----------------------------------------------------------------------------------------------
Per pixel of the upsampled teacher, as the reference's ``entropy`` option says. ``"normalized"``: the
argmax of the logits (first index on ties, as torch.argmax) and e = H(p)/log K with H(p) = log L − T/L,
L = Σ e^{z_c−m}, T = Σ e^{z_c−m}·(z_c−m) (online over class chunks: on a max change m → m', L ← αL,
T ← α(T + (m−m')L) with α = e^{m−m'}), which avoids the cancellation of lse − Σ p_c z_c. ``"plop"``
(PLOP_ENTROPY): PLOP's e = −(1/ln(K + 1e-8))·mean_c p_c·log(p_c + 1e-8) / ln K_total needs p_c = e^{z_c−m}/L
with the final m and L inside the log, so a first sweep finds m and L online and a second one sums
p_c·log(p_c + 1e-8) and takes the argmax of p_c (PLOP's ``probs.max``); the two constants are computed in
float64 and rounded once. The histogram kernel counts every label-0 pixel at (argmax, clamp(⌊e·num_bins⌋,
0, num_bins−1)) in its *own* int32 histogram (program p adds into copy p mod HISTOGRAM_COPIES: one per
program up to 512 programs, so the memory stays ≤ 512·K·num_bins·4 bytes; programs sharing a copy are 512
apart in the launch order; the launcher sums the copies, a fixed-order reduction): inside a pixel tile, equal
(prediction, bin) pairs are first counted together, so each distinct pair of a tile is one integer atomic
add to a histogram no concurrent program touches — no hot spot, and integer sums are exact and
order-independent. The pseudo-label kernel writes the new label
(int64) and per-band counts of label-0 pixels and of those that took a pseudo-label (B, bands, 2).

Offsets inside an image along the label and mask strides are int32 unless an image spans 2³¹ elements or
more (the launchers then pass int64, IDX); image offsets, and pixel offsets into the per-pixel outputs, are
int64. Every load and store of tensor data is masked (the scalar loads of the sums' gradient and the stores
of a program's partial sums are in bounds by construction); any
strides of masks and labels are read in place; sums accumulate in float32 (float64 for float64 masks).
Every grid is one flat axis (its fastest index first, the image last): CUDA caps grid axes 1 and 2 at 65535.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .utils import Target, compute_dtype, device_guard, launch_target, num_warps, pow2_tile, tl_dtype

NUM_SUMS = 8  # see the module docstring: CE·M_old, CE·M_new, M_old, M_new, P_new·M_new, P_new·valid, P_old·M_old, P_old·valid
# Copies of the entropy histogram (program p adds into copy p mod HISTOGRAM_COPIES): ≤ 20 MB at K_old = 101.
HISTOGRAM_COPIES = 512


@dataclasses.dataclass(frozen=True)
class SegHeadPlan:
    """The launch plan of the seg-head kernels for a target (``seg_head_plan``).

    Attributes:
        fwd_band, bwd_band: cells per side of a program's band (forward and teacher kernels; backward).
        max_block_r, max_block_c: the largest pixel tile inside a cell (rows, columns).
        fwd_block_ks, bwd_block_ks: the class-block candidates of the forward's online softmax and of a
            backward program (``_class_block``); empty: every class in one block, up to 256.
        histogram_tile_pixels: pixels per tile of the entropy histogram, whose tiles compare all pairs of
            their pixels' keys.
    """

    fwd_band: int
    bwd_band: int
    max_block_r: int
    max_block_c: int
    fwd_block_ks: tuple[int, ...]
    bwd_block_ks: tuple[int, ...]
    histogram_tile_pixels: int


# On a GPU. The backward walks one ring of cells beyond its band (their λ-parts reach its first row and
# column): 8 × 8 cells cost (9/8)² = 1.27× the useful work and still give ≥ 2 programs per SM at the paper
# shapes (above). The forward and teacher kernels recompute nothing: 4 × 4 cells give them 512 programs at
# batch 8. Pixel tiles are powers of two ≥ the cell where they fit, at most 4 × 16 (a 16 × 16 cell of the
# paper's 16× upsampling is four 4 × 16 tiles: larger ones spill registers on sm_90). Classes per block: a
# pow2_tile of K among (32, 16, 8) forward (32 for 151 classes, 8 for 21) and (16, 8) backward (16 for
# 151, 8 for 21).
GPU_PLAN = SegHeadPlan(fwd_band=4, bwd_band=8, max_block_r=4, max_block_c=16, fwd_block_ks=(32, 16, 8),
                       bwd_block_ks=(16, 8), histogram_tile_pixels=64)
# Under the interpreter programs run one after another and every loop trip costs Python overhead whatever
# its size: a band of 64 × 64 cells (the whole mask of a test), tiles as large as a cell, every class (up to
# 256) in one block.
INTERPRETER_PLAN = SegHeadPlan(fwd_band=64, bwd_band=64, max_block_r=64, max_block_c=64, fwd_block_ks=(),
                               bwd_block_ks=(), histogram_tile_pixels=256)


def seg_head_plan(target: Target) -> SegHeadPlan:
    """The seg-head launch plan of ``target``: GPU_PLAN for a GPU (any, named or not), else INTERPRETER_PLAN."""
    return GPU_PLAN if target.gpu else INTERPRETER_PLAN


# Registers per thread the launchers spend on one (classes × rows × columns) block before going to 8 warps.
VALUES_PER_THREAD = 4


@triton.jit
def _cell_starts(first, in_size, out_size, ACC_DTYPE: tl.constexpr, N: tl.constexpr):
    """(N,) int32: for cells first, …, first + N − 1, the first output index d with ⌊src(d)⌋ ≥ cell (0 for a
    cell ≤ 0, out_size for a cell ≥ in_size).

    Exact: ⌊src⌋ is evaluated, as the pixels evaluate it, on eight candidates around the rational solution
    ((2·cell + 1)·out − in) / (2·in) of src = cell, which float rounding moves by at most one index.
    """
    cells = tl.cast(first, tl.int64) + tl.arange(0, N).to(tl.int64)
    estimate = ((2 * cells + 1) * out_size - in_size) // (2 * tl.cast(in_size, tl.int64))
    candidates = estimate[:, None] - 3 + tl.arange(0, 8).to(tl.int64)[None, :]
    src = tl.maximum((candidates.to(ACC_DTYPE) + 0.5) * (tl.cast(in_size, ACC_DTYPE) / tl.cast(out_size, ACC_DTYPE))
                     - 0.5, 0.0)
    below = (candidates < 0) | (src.to(tl.int64) < cells[:, None])
    start = tl.minimum(tl.maximum(estimate - 3 + tl.sum(below.to(tl.int64), axis=1), 0), out_size)
    start = tl.where(cells <= 0, 0, tl.where(cells >= in_size, out_size, start))
    return start.to(tl.int32)


@triton.jit
def _band_cells(first_row, first_col, h, w, H, W, ACC_DTYPE: tl.constexpr, BAND: tl.constexpr):
    """What a program walking cells from (first_row, first_col) needs once: the source-position scales
    (h/H, w/W) and the starts of 2·BAND cells along each axis (entry i: cell first + i; read with
    ``tl.sum(tl.where(cell_index == i, starts, 0))``)."""
    scale_y = tl.cast(h, ACC_DTYPE) / tl.cast(H, ACC_DTYPE)
    scale_x = tl.cast(w, ACC_DTYPE) / tl.cast(W, ACC_DTYPE)
    cell_index = tl.arange(0, 2 * BAND)
    row_starts = _cell_starts(first_row, h, H, ACC_DTYPE, 2 * BAND)
    col_starts = _cell_starts(first_col, w, W, ACC_DTYPE, 2 * BAND)
    return scale_y, scale_x, cell_index, row_starts, col_starts


@triton.jit
def _cell_lerps(class_ptr, in_classes, row0, row1, col0, col1, lx, ACC_DTYPE: tl.constexpr):
    """(top, bottom − top) of a cell's tile columns, (BLOCK_K, BLOCK_C): the four corner values of each class
    (class_ptr (BLOCK_K,) pointers to their mask plane; row/col offsets already times the strides), 0 for
    classes outside [0, K)."""
    m00 = tl.load(class_ptr + row0 + col0, mask=in_classes, other=0.0).to(ACC_DTYPE)
    m01 = tl.load(class_ptr + row0 + col1, mask=in_classes, other=0.0).to(ACC_DTYPE)
    m10 = tl.load(class_ptr + row1 + col0, mask=in_classes, other=0.0).to(ACC_DTYPE)
    m11 = tl.load(class_ptr + row1 + col1, mask=in_classes, other=0.0).to(ACC_DTYPE)
    top = m00[:, None] + (m01 - m00)[:, None] * lx[None, :]
    bottom = m10[:, None] + (m11 - m10)[:, None] * lx[None, :]
    return top, bottom - top


@triton.jit
def _band_of(program, n_row_bands, n_col_bands, BAND: tl.constexpr):
    """(image int64, first cell row, first cell column) of a band program (column bands fastest)."""
    col_band = program % n_col_bands
    rest = program // n_col_bands
    return (rest // n_row_bands).to(tl.int64), (rest % n_row_bands) * BAND, col_band * BAND


@triton.jit
def _seg_head_loss_fwd_kernel(
    masks_ptr,  # (B, K, h, w) any strides, any float dtype: patch-resolution logits
    labels_ptr,  # (B, H, W) any strides, any integer dtype: CE targets
    dice_labels_ptr,  # (B, H, W) any strides, any integer dtype: the dice's M_old / M_new
    partials_ptr,  # (B, bands, 8) contiguous, accumulation dtype: output, per-band sums
    pixel_stats_ptr,  # (B, 3, H·W) contiguous, accumulation dtype: output, per-pixel (lse, P_new, P_old)
    K, h, w, H, W,  # classes, mask size, label size
    num_old,  # classes [0, num_old) are old
    ignore_index,  # label value of ignored pixels
    n_row_bands, n_col_bands,  # cdiv(h, BAND), cdiv(w, BAND)
    stride_mb, stride_mk, stride_my, stride_mx,  # masks strides
    stride_lb, stride_ly, stride_lx,  # labels strides
    stride_db, stride_dy, stride_dx,  # dice_labels strides
    ACC_DTYPE: tl.constexpr,  # accumulation dtype (tl.float32 or tl.float64)
    IDX: tl.constexpr,  # dtype of offsets inside an image (tl.int32 or tl.int64)
    BAND: tl.constexpr,  # cells per side of a band
    BLOCK_K: tl.constexpr,  # classes per chunk
    BLOCK_R: tl.constexpr,  # pixel rows per tile
    BLOCK_C: tl.constexpr,  # pixel columns per tile
):
    image, first_row, first_col = _band_of(tl.program_id(0), n_row_bands, n_col_bands, BAND)
    masks_image = masks_ptr + image * stride_mb
    labels_image = labels_ptr + image * stride_lb
    dice_labels_image = dice_labels_ptr + image * stride_db
    num_pixels = tl.cast(H, tl.int64) * W
    stats_image = pixel_stats_ptr + image * 3 * num_pixels
    tile_rows = tl.arange(0, BLOCK_R).to(IDX)
    tile_cols = tl.arange(0, BLOCK_C).to(IDX)
    chunk = tl.arange(0, BLOCK_K).to(IDX)
    # The eight sums, per pixel position of the tile; reduced once at the end.
    sum_ce_old = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    sum_ce_new = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    sum_m_old = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    sum_m_new = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    sum_pnew_new = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    sum_pnew_valid = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    sum_pold_old = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    sum_pold_valid = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)

    scale_y, scale_x, cell_index, row_starts, col_starts = _band_cells(first_row, first_col, h, w, H, W,
                                                                       ACC_DTYPE, BAND)
    row_start = tl.sum(tl.where(cell_index == 0, row_starts, 0))
    for Y in range(first_row, tl.minimum(first_row + BAND, h)):
        row_end = tl.sum(tl.where(cell_index == Y + 1 - first_row, row_starts, 0))
        row0 = tl.cast(Y, IDX) * stride_my
        row1 = tl.cast(tl.minimum(Y + 1, h - 1), IDX) * stride_my
        col_start = tl.sum(tl.where(cell_index == 0, col_starts, 0))
        for X in range(first_col, tl.minimum(first_col + BAND, w)):
            col_end = tl.sum(tl.where(cell_index == X + 1 - first_col, col_starts, 0))
            col0 = tl.cast(X, IDX) * stride_mx
            col1 = tl.cast(tl.minimum(X + 1, w - 1), IDX) * stride_mx
            for r_start in range(row_start, row_end, BLOCK_R):
                rows = r_start + tile_rows
                ly = tl.maximum((rows.to(ACC_DTYPE) + 0.5) * scale_y - 0.5, 0.0) - tl.cast(Y, ACC_DTYPE)
                for c_start in range(col_start, col_end, BLOCK_C):
                    cols = c_start + tile_cols
                    lx = tl.maximum((cols.to(ACC_DTYPE) + 0.5) * scale_x - 0.5, 0.0) - tl.cast(X, ACC_DTYPE)
                    in_tile = (rows < row_end)[:, None] & (cols < col_end)[None, :]
                    label = tl.load(labels_image + rows[:, None] * stride_ly + cols[None, :] * stride_lx,
                                    mask=in_tile, other=ignore_index).to(tl.int64)
                    dice_label = tl.load(dice_labels_image + rows[:, None] * stride_dy + cols[None, :] * stride_dx,
                                         mask=in_tile, other=ignore_index).to(tl.int64)
                    ce_valid = in_tile & (label != ignore_index) & (label >= 0) & (label < K)

                    running_max = tl.full((BLOCK_R, BLOCK_C), float("-inf"), ACC_DTYPE)
                    mass_old = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
                    mass_new = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
                    for k_start in range(0, K, BLOCK_K):
                        classes = k_start + chunk
                        in_classes = classes < K
                        top, span = _cell_lerps(masks_image + classes * stride_mk, in_classes,
                                                row0, row1, col0, col1, lx, ACC_DTYPE)
                        z = tl.where(in_classes[:, None, None], (top[:, None, :] + span[:, None, :] * ly[None, :, None]), float("-inf"))
                        new_max = tl.maximum(running_max, tl.max(z, axis=0))
                        rescale = tl.exp(running_max - new_max)
                        e = tl.exp(z - new_max[None, :, :])
                        if k_start >= num_old:  # a chunk of new classes only
                            chunk_new = tl.sum(e, axis=0)
                            chunk_old = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
                        elif k_start + BLOCK_K <= num_old:  # old classes only
                            chunk_new = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
                            chunk_old = tl.sum(e, axis=0)
                        else:
                            is_new_class = (classes >= num_old)[:, None, None]
                            chunk_new = tl.sum(tl.where(is_new_class, e, 0.0), axis=0)
                            chunk_old = tl.sum(tl.where(is_new_class, 0.0, e), axis=0)
                        mass_new = mass_new * rescale + chunk_new
                        mass_old = mass_old * rescale + chunk_old
                        running_max = new_max

                    # The label's own logit, from its four mask values, formed as z_c was (same rounding).
                    # A pixel whose label is outside [0, K) (ignored) reads class 0's values and drops them:
                    # what is loaded depends on the shapes only, not on the labels.
                    label_ptr = masks_image + tl.where(ce_valid, label, 0).to(IDX) * stride_mk
                    l00 = tl.load(label_ptr + row0 + col0, mask=in_tile, other=0.0).to(ACC_DTYPE)
                    l01 = tl.load(label_ptr + row0 + col1, mask=in_tile, other=0.0).to(ACC_DTYPE)
                    l10 = tl.load(label_ptr + row1 + col0, mask=in_tile, other=0.0).to(ACC_DTYPE)
                    l11 = tl.load(label_ptr + row1 + col1, mask=in_tile, other=0.0).to(ACC_DTYPE)
                    label_top = l00 + (l01 - l00) * lx[None, :]
                    label_logit = label_top + ((l10 + (l11 - l10) * lx[None, :]) - label_top) * ly[:, None]

                    total = mass_old + mass_new
                    lse = running_max + tl.log(total)
                    p_new = mass_new / total
                    p_old = mass_old / total
                    # Labels outside [0, K) count as ignore_index (see the reference).
                    ce_new = ce_valid & (label >= num_old)
                    ce_old = ce_valid & (label < num_old)
                    valid = in_tile & (dice_label != ignore_index) & (dice_label >= 0) & (dice_label < K)
                    label_new = valid & (dice_label >= num_old)
                    label_old = valid & (dice_label < num_old)
                    ce = lse - label_logit

                    pixel = rows.to(tl.int64)[:, None] * W + cols[None, :]
                    tl.store(stats_image + pixel, lse, mask=in_tile)
                    tl.store(stats_image + num_pixels + pixel, p_new, mask=in_tile)
                    tl.store(stats_image + 2 * num_pixels + pixel, p_old, mask=in_tile)
                    sum_ce_old += tl.where(ce_old, ce, 0.0)
                    sum_ce_new += tl.where(ce_new, ce, 0.0)
                    sum_m_old += label_old.to(ACC_DTYPE)
                    sum_m_new += label_new.to(ACC_DTYPE)
                    sum_pnew_new += tl.where(label_new, p_new, 0.0)
                    sum_pnew_valid += tl.where(valid, p_new, 0.0)
                    sum_pold_old += tl.where(label_old, p_old, 0.0)
                    sum_pold_valid += tl.where(valid, p_old, 0.0)
            col_start = col_end
        row_start = row_end
    partials = partials_ptr + tl.program_id(0).to(tl.int64) * 8
    tl.store(partials, tl.sum(tl.sum(sum_ce_old, axis=1), axis=0))
    tl.store(partials + 1, tl.sum(tl.sum(sum_ce_new, axis=1), axis=0))
    tl.store(partials + 2, tl.sum(tl.sum(sum_m_old, axis=1), axis=0))
    tl.store(partials + 3, tl.sum(tl.sum(sum_m_new, axis=1), axis=0))
    tl.store(partials + 4, tl.sum(tl.sum(sum_pnew_new, axis=1), axis=0))
    tl.store(partials + 5, tl.sum(tl.sum(sum_pnew_valid, axis=1), axis=0))
    tl.store(partials + 6, tl.sum(tl.sum(sum_pold_old, axis=1), axis=0))
    tl.store(partials + 7, tl.sum(tl.sum(sum_pold_valid, axis=1), axis=0))


@triton.jit
def _seg_head_loss_bwd_kernel(
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
    n_row_bands, n_col_bands,  # cdiv(h, BAND), cdiv(w, BAND)
    stride_mb, stride_mk, stride_my, stride_mx,  # masks strides
    stride_lb, stride_ly, stride_lx,  # labels strides
    stride_db, stride_dy, stride_dx,  # dice_labels strides
    stride_gb, stride_gs,  # grad_sums strides
    ACC_DTYPE: tl.constexpr,  # accumulation dtype (tl.float32 or tl.float64)
    IDX: tl.constexpr,  # dtype of offsets inside an image (tl.int32 or tl.int64)
    BAND: tl.constexpr,  # cells per side of a band (output rows / columns of a program)
    BLOCK_K: tl.constexpr,  # classes per program
    BLOCK_R: tl.constexpr,  # pixel rows per tile
    BLOCK_C: tl.constexpr,  # pixel columns per tile
):
    # Flat grid: class chunk fastest (the programs of one band share its labels and stats in L2), then the
    # band, then the image.
    k_block = tl.program_id(0) % n_k_blocks
    image, first_row, first_col = _band_of(tl.program_id(0) // n_k_blocks, n_row_bands, n_col_bands, BAND)
    classes = (k_block * BLOCK_K + tl.arange(0, BLOCK_K)).to(IDX)
    in_classes = classes < K
    is_new_class = (classes >= num_old)[:, None, None]
    band_rows = tl.arange(0, BAND)
    tile_rows = tl.arange(0, BLOCK_R).to(IDX)
    tile_cols = tl.arange(0, BLOCK_C).to(IDX)

    # Scalar loads, in bounds by construction (the grid has exactly B images; slots 0..7 of 8).
    grad_image = grad_sums_ptr + image * stride_gb
    g_ce_old = tl.load(grad_image).to(ACC_DTYPE)
    g_ce_new = tl.load(grad_image + stride_gs).to(ACC_DTYPE)
    g_pnew_new = tl.load(grad_image + 4 * stride_gs).to(ACC_DTYPE)
    g_pnew_valid = tl.load(grad_image + 5 * stride_gs).to(ACC_DTYPE)
    g_pold_old = tl.load(grad_image + 6 * stride_gs).to(ACC_DTYPE)
    g_pold_valid = tl.load(grad_image + 7 * stride_gs).to(ACC_DTYPE)

    class_ptr = masks_ptr + image * stride_mb + classes * stride_mk
    labels_image = labels_ptr + image * stride_lb
    dice_labels_image = dice_labels_ptr + image * stride_db
    num_pixels = tl.cast(H, tl.int64) * W
    stats_image = pixel_stats_ptr + image * 3 * num_pixels
    out_ptr = grad_masks_ptr + ((image * K + classes.to(tl.int64)[:, None]) * h
                                + (first_row + band_rows)[None, :]) * w
    out_mask = in_classes[:, None] & (first_row + band_rows < h)[None, :]

    # One ring of cells above and left of the band: their λ-parts reach its first row and column.
    first_y = tl.maximum(first_row - 1, 0)
    first_x = tl.maximum(first_col - 1, 0)
    carry = tl.zeros((BLOCK_K, BAND), ACC_DTYPE)  # the λx part of the previous column, per output row
    # The cells walked start at the ring: entry i of the starts is cell first_y / first_x + i.
    scale_y, scale_x, cell_index, row_starts, col_starts = _band_cells(first_y, first_x, h, w, H, W, ACC_DTYPE, BAND)
    col_start = tl.sum(tl.where(cell_index == 0, col_starts, 0))
    for X in range(first_x, tl.minimum(first_col + BAND, w)):
        col_end = tl.sum(tl.where(cell_index == X + 1 - first_x, col_starts, 0))
        col0 = tl.cast(X, IDX) * stride_mx
        col1 = tl.cast(tl.minimum(X + 1, w - 1), IDX) * stride_mx
        to_column = tl.zeros((BLOCK_K, BAND), ACC_DTYPE)  # Σ dz·(1−λx)·Ay, reaches column X
        to_next_column = tl.zeros((BLOCK_K, BAND), ACC_DTYPE)  # Σ dz·λx·Ay, reaches column X + 1
        row_start = tl.sum(tl.where(cell_index == 0, row_starts, 0))
        for Y in range(first_y, tl.minimum(first_row + BAND, h)):
            row_end = tl.sum(tl.where(cell_index == Y + 1 - first_y, row_starts, 0))
            row0 = tl.cast(Y, IDX) * stride_my
            row1 = tl.cast(tl.minimum(Y + 1, h - 1), IDX) * stride_my
            # The band's output rows that rows of cell Y reach: Y with 1 − λy, min(Y + 1, h − 1) with λy
            # (−1 and BAND fall outside the band and match none).
            here = band_rows == Y - first_row
            below = band_rows == tl.minimum(Y + 1, h - 1) - first_row
            # The cell's sums per class: (1−λx part, λx part) × (1−λy part, λy part).
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
                    dice_label = tl.load(dice_labels_image + rows[:, None] * stride_dy + cols[None, :] * stride_dx,
                                         mask=in_tile, other=ignore_index).to(tl.int64)
                    pixel = rows.to(tl.int64)[:, None] * W + cols[None, :]
                    # +inf outside the tile: p = 0 there, never exp of a large logit.
                    lse = tl.load(stats_image + pixel, mask=in_tile, other=float("inf"))
                    p_new = tl.load(stats_image + num_pixels + pixel, mask=in_tile, other=0.0)
                    p_old = tl.load(stats_image + 2 * num_pixels + pixel, mask=in_tile, other=0.0)
                    ce_valid = in_tile & (label != ignore_index) & (label >= 0) & (label < K)
                    valid = in_tile & (dice_label != ignore_index) & (dice_label >= 0) & (dice_label < K)
                    g_ce = tl.where(ce_valid & (label < num_old), g_ce_old, 0.0) + tl.where(
                        ce_valid & (label >= num_old), g_ce_new, 0.0
                    )
                    g_p = (
                        tl.where(valid & (dice_label >= num_old), g_pnew_new, 0.0)
                        + tl.where(valid, g_pnew_valid - g_pold_valid, 0.0)
                        - tl.where(valid & (dice_label < num_old), g_pold_old, 0.0)
                    )
                    coef_new = g_ce + g_p * p_old  # dz_c / p_c of a new class
                    coef_old = g_ce - g_p * p_new  # … of an old class

                    top, span = _cell_lerps(class_ptr, in_classes, row0, row1, col0, col1, lx, ACC_DTYPE)
                    p = tl.exp((top[:, None, :] + span[:, None, :] * ly[None, :, None]) - lse[None, :, :])
                    dz = p * tl.where(is_new_class, coef_new[None, :, :], coef_old[None, :, :])
                    # Labels outside [0, K) become −1, which no class matches (their g_ce is 0 anyway).
                    target = tl.where(ce_valid, label, -1).to(IDX)
                    dz -= tl.where(classes[:, None, None] == target[None, :, :], g_ce[None, :, :], 0.0)
                    # Columns first (per tile row), then the rows.
                    dz_next = dz * lx[None, None, :]
                    row_sums = tl.sum(dz - dz_next, axis=2)  # (BLOCK_K, BLOCK_R): reaches column X
                    next_row_sums = tl.sum(dz_next, axis=2)  # reaches column X + 1
                    column_here += tl.sum(row_sums * (1.0 - ly)[None, :], axis=1)
                    column_below += tl.sum(row_sums * ly[None, :], axis=1)
                    next_column_here += tl.sum(next_row_sums * (1.0 - ly)[None, :], axis=1)
                    next_column_below += tl.sum(next_row_sums * ly[None, :], axis=1)
            # Onto the band's output rows Y (1 − λy parts) and Y + 1 (λy parts; both Y at the last row).
            to_column += (tl.where(here[None, :], column_here[:, None], 0.0)
                          + tl.where(below[None, :], column_below[:, None], 0.0))
            to_next_column += (tl.where(here[None, :], next_column_here[:, None], 0.0)
                               + tl.where(below[None, :], next_column_below[:, None], 0.0))
            row_start = row_end
        # Column X: its own (1−λx) part, the λx part of column X − 1 and, at the last column (x1 = x0), its own
        # λx part too. The ring column left of the band is not the band's: only its carry is kept.
        column = to_column + carry + tl.where(X == w - 1, to_next_column, 0.0)
        tl.store(out_ptr + X, column.to(grad_masks_ptr.dtype.element_ty), mask=out_mask & (X >= first_col))
        carry = to_next_column
        col_start = col_end


@triton.jit
def _teacher_pixel_stats(
    masks_image, K, num_classes, row0, row1, col0, col1, ly, lx, stride_mk,
    ACC_DTYPE: tl.constexpr, IDX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr, PLOP_ENTROPY: tl.constexpr,
):
    """(prediction (BLOCK_R, BLOCK_C) int64, entropy) of the upsampled teacher on a tile of one cell.

    PLOP_ENTROPY: PLOP's −(1/ln(K + 1e-8))·mean_c p_c·log(p_c + 1e-8) / ln(num_classes) and the argmax of the
    probabilities (two sweeps over the classes: log(p + 1e-8) needs the final normaliser); otherwise the
    normalised entropy H(p)/ln K and the argmax of the logits in one online sweep.
    """
    chunk = tl.arange(0, BLOCK_K).to(IDX)
    running_max = tl.full((BLOCK_R, BLOCK_C), float("-inf"), ACC_DTYPE)
    best = tl.zeros((BLOCK_R, BLOCK_C), tl.int64)
    mass = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
    weighted = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)  # T = Σ e^{z−m}(z−m)
    for k_start in range(0, K, BLOCK_K):
        classes = k_start + chunk
        in_classes = classes < K
        top, span = _cell_lerps(masks_image + classes * stride_mk, in_classes, row0, row1, col0, col1, lx,
                                ACC_DTYPE)
        z = tl.where(in_classes[:, None, None], (top[:, None, :] + span[:, None, :] * ly[None, :, None]), float("-inf"))
        chunk_max = tl.max(z, axis=0)
        new_max = tl.maximum(running_max, chunk_max)
        shift = running_max - new_max
        rescale = tl.exp(shift)
        # Absent classes (z = −inf) get e = 0 and a finite centred logit, so e·centred is 0, not NaN.
        centred = tl.where(in_classes[:, None, None], z - new_max[None, :, :], 0.0)
        e = tl.where(in_classes[:, None, None], tl.exp(centred), 0.0)
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
        best_prob = tl.full((BLOCK_R, BLOCK_C), -1.0, ACC_DTYPE)
        p_log_p = tl.zeros((BLOCK_R, BLOCK_C), ACC_DTYPE)
        for k_start in range(0, K, BLOCK_K):
            classes = k_start + chunk
            in_classes = classes < K
            top, span = _cell_lerps(masks_image + classes * stride_mk, in_classes, row0, row1, col0, col1, lx,
                                    ACC_DTYPE)
            z = (top[:, None, :] + span[:, None, :] * ly[None, :, None])
            # softmax as torch computes it: exp(z − max) / Σ exp(z − max); 0 for absent classes.
            p = tl.where(in_classes[:, None, None], tl.exp(z - running_max[None, :, :]) / mass[None, :, :], 0.0)
            p_log_p += tl.sum(p * tl.log(p + 1e-8), axis=0)
            p_or_absent = tl.where(in_classes[:, None, None], p, -1.0)
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
def _plop_teacher_kernel(
    masks_ptr,  # (B, K, h, w) any strides, any float dtype: teacher masks
    labels_ptr,  # (B, H, W) any strides, any integer dtype
    thresholds_ptr,  # (K,) any stride, float: per-class entropy thresholds (pseudo-labels only)
    histograms_ptr,  # (copies, K, num_bins) int32, zero-initialised: output, copy p mod copies for program p
    pseudo_ptr,  # (B, H, W) contiguous int64: output, pseudo-labels (pseudo-labels only)
    counts_ptr,  # (B, bands, 2) contiguous int32: output, per band (#label-0 pixels, #pseudo-labelled)
    K, num_classes, h, w, H, W,  # num_classes: K_total (PLOP_ENTROPY only)
    num_bins,  # entropy bins over [0, 1] (histogram only)
    n_histograms,  # copies of the histogram (histogram only)
    ignore_index,
    n_row_bands, n_col_bands,
    stride_mb, stride_mk, stride_my, stride_mx,
    stride_lb, stride_ly, stride_lx,
    stride_t,
    ACC_DTYPE: tl.constexpr,
    IDX: tl.constexpr,
    BAND: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PLOP_ENTROPY: tl.constexpr,
    HISTOGRAM: tl.constexpr,  # True: the entropy histogram; False: the pseudo-labels
):
    program = tl.program_id(0)
    image, first_row, first_col = _band_of(program, n_row_bands, n_col_bands, BAND)
    masks_image = masks_ptr + image * stride_mb
    labels_image = labels_ptr + image * stride_lb
    num_pixels = tl.cast(H, tl.int64) * W
    histogram = histograms_ptr + (program % n_histograms).to(tl.int64) * K * num_bins
    tile_rows = tl.arange(0, BLOCK_R).to(IDX)
    tile_cols = tl.arange(0, BLOCK_C).to(IDX)
    # Pair (i, j) of a tile's pixels, flattened: j before i (for the first of equal histogram keys).
    flat = tl.arange(0, BLOCK_R * BLOCK_C)
    earlier = flat[None, :] < flat[:, None]
    background_count = tl.zeros((BLOCK_R, BLOCK_C), tl.int32)  # per pixel position of the tile
    pseudo_count = tl.zeros((BLOCK_R, BLOCK_C), tl.int32)

    scale_y, scale_x, cell_index, row_starts, col_starts = _band_cells(first_row, first_col, h, w, H, W,
                                                                       ACC_DTYPE, BAND)
    row_start = tl.sum(tl.where(cell_index == 0, row_starts, 0))
    for Y in range(first_row, tl.minimum(first_row + BAND, h)):
        row_end = tl.sum(tl.where(cell_index == Y + 1 - first_row, row_starts, 0))
        row0 = tl.cast(Y, IDX) * stride_my
        row1 = tl.cast(tl.minimum(Y + 1, h - 1), IDX) * stride_my
        col_start = tl.sum(tl.where(cell_index == 0, col_starts, 0))
        for X in range(first_col, tl.minimum(first_col + BAND, w)):
            col_end = tl.sum(tl.where(cell_index == X + 1 - first_col, col_starts, 0))
            col0 = tl.cast(X, IDX) * stride_mx
            col1 = tl.cast(tl.minimum(X + 1, w - 1), IDX) * stride_mx
            for r_start in range(row_start, row_end, BLOCK_R):
                rows = r_start + tile_rows
                ly = tl.maximum((rows.to(ACC_DTYPE) + 0.5) * scale_y - 0.5, 0.0) - tl.cast(Y, ACC_DTYPE)
                for c_start in range(col_start, col_end, BLOCK_C):
                    cols = c_start + tile_cols
                    lx = tl.maximum((cols.to(ACC_DTYPE) + 0.5) * scale_x - 0.5, 0.0) - tl.cast(X, ACC_DTYPE)
                    in_tile = (rows < row_end)[:, None] & (cols < col_end)[None, :]
                    label = tl.load(labels_image + rows[:, None] * stride_ly + cols[None, :] * stride_lx,
                                    mask=in_tile, other=1).to(tl.int64)
                    background = in_tile & (label == 0)
                    prediction, entropy = _teacher_pixel_stats(
                        masks_image, K, num_classes, row0, row1, col0, col1, ly, lx, stride_mk,
                        ACC_DTYPE, IDX, BLOCK_R, BLOCK_C, BLOCK_K, PLOP_ENTROPY,
                    )
                    if HISTOGRAM:
                        bins = tl.minimum(tl.maximum((entropy * num_bins).to(tl.int64), 0), num_bins - 1)
                        key = tl.reshape(tl.where(background, prediction * num_bins + bins, -1),
                                         (BLOCK_R * BLOCK_C,))
                        same = (key[:, None] == key[None, :]) & (key[:, None] >= 0)
                        copies = tl.sum(same.to(tl.int32), axis=1)
                        first = tl.sum((same & earlier).to(tl.int32), axis=1) == 0
                        # One add per distinct (prediction, bin) of the tile, into this program's histogram.
                        tl.atomic_add(histogram + key, copies, mask=(copies > 0) & first)
                    else:
                        threshold = tl.load(thresholds_ptr + prediction * stride_t, mask=in_tile,
                                            other=0.0).to(ACC_DTYPE)
                        confident = background & (entropy < threshold)
                        pseudo = tl.where(background, tl.where(confident, prediction, ignore_index), label)
                        pixel = rows.to(tl.int64)[:, None] * W + cols[None, :]
                        tl.store(pseudo_ptr + image * num_pixels + pixel, pseudo, mask=in_tile)
                        background_count += background.to(tl.int32)
                        pseudo_count += confident.to(tl.int32)
            col_start = col_end
        row_start = row_end
    if not HISTOGRAM:
        slot = tl.arange(0, 2)
        counts = tl.where(slot == 0, tl.sum(tl.sum(background_count, axis=1), axis=0),
                          tl.sum(tl.sum(pseudo_count, axis=1), axis=0))
        tl.store(counts_ptr + program.to(tl.int64) * 2 + slot, counts, mask=slot < 2)


# ------------------------------------------------------------------------------------------ launchers
def _index_dtype(*tensors: torch.Tensor):
    """tl.int32 when every offset inside one image (dims after the first, times their strides) fits in int32."""
    span = max(sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
               for t in tensors)
    return tl.int32 if span < 2**31 else tl.int64


def _pixel_tile(in_size: int, out_size: int, largest: int) -> int:
    """Pixels per tile along an axis: the power of two covering a cell (⌈out/in⌉ pixels), at most ``largest``."""
    return max(1, min(largest, triton.next_power_of_2(-(-out_size // max(in_size, 1)))))


def _bands(h: int, w: int, band: int) -> tuple[int, int]:
    """Bands of ``band`` × ``band`` cells along the rows and columns (the kernels' cell-start vectors hold
    2·band entries, which covers a band and its ring for band ≥ 2)."""
    if band < 2 or band & (band - 1):
        raise ValueError(f"band must be a power of two ≥ 2, got {band}")
    return triton.cdiv(h, band), triton.cdiv(w, band)


def _launch_constexprs(plan: SegHeadPlan, block_k: int, masks: torch.Tensor, labels: torch.Tensor,
                       *others: torch.Tensor, max_tile_pixels: int | None = None) -> dict:
    """The constexprs of a launch under ``plan``: dtypes, tiles and its warps (``others``: more label-shaped
    inputs; ``max_tile_pixels``: a cap below the plan's largest tile)."""
    _, _, h, w = masks.shape
    _, height, width = labels.shape
    if max_tile_pixels is None:
        max_tile_pixels = plan.max_block_r * plan.max_block_c
    block_c = min(_pixel_tile(w, width, plan.max_block_c), max_tile_pixels)
    block_r = min(_pixel_tile(h, height, plan.max_block_r), max_tile_pixels // block_c)
    return dict(ACC_DTYPE=tl_dtype(compute_dtype(masks.dtype)), IDX=_index_dtype(masks, labels, *others),
                BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_C=block_c,
                num_warps=num_warps(block_k * block_r * block_c, VALUES_PER_THREAD))


def _class_block(num_classes: int, candidates: tuple[int, ...]) -> int:
    """Classes per block: the power of two among ``candidates`` that pads K little (forward 151 → 32, 160
    lanes; 21 → 8, 24 lanes; 101 → 32, 128 lanes; backward 151 → 16, 21 → 8); with no candidates (the
    interpreter's plan) every class in one block, up to 256."""
    if not candidates:
        return max(2, min(256, triton.next_power_of_2(num_classes)))
    return pow2_tile(num_classes, candidates)


def seg_head_loss_forward(
    masks: torch.Tensor, labels: torch.Tensor, dice_labels: torch.Tensor, num_old: int, ignore_index: int,
    *, band: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image sums (B, 8) and per-pixel (lse, P_new, P_old) (B, 3, H, W), both in the accumulation dtype.
    ``band``: cells per side of a program (≥ 2, a power of two); None: the launch plan's."""
    batch, num_classes, h, w = masks.shape
    _, height, width = labels.shape
    acc = compute_dtype(masks.dtype)
    plan = seg_head_plan(launch_target(masks.device))
    band = plan.fwd_band if band is None else band
    n_row_bands, n_col_bands = _bands(h, w, band)
    partials = torch.empty((batch, n_row_bands * n_col_bands, NUM_SUMS), dtype=acc, device=masks.device)
    pixel_stats = torch.empty((batch, 3, height, width), dtype=acc, device=masks.device)
    if batch * height * width > 0:
        constexprs = _launch_constexprs(plan, _class_block(num_classes, plan.fwd_block_ks), masks, labels,
                                        dice_labels)
        with device_guard(masks.device):  # launch on the tensors' GPU, not the current one
            _seg_head_loss_fwd_kernel[(n_row_bands * n_col_bands * batch,)](
                masks, labels, dice_labels, partials, pixel_stats,
                num_classes, h, w, height, width, num_old, ignore_index, n_row_bands, n_col_bands,
                *masks.stride(), *labels.stride(), *dice_labels.stride(), BAND=band, **constexprs,
            )
    else:
        partials.zero_()
    # Fixed-order reduction over the bands: deterministic.
    return partials.sum(1), pixel_stats


def seg_head_loss_backward(
    grad_sums: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    dice_labels: torch.Tensor,
    pixel_stats: torch.Tensor,
    num_old: int,
    ignore_index: int,
    *,
    band: int | None = None,
) -> torch.Tensor:
    """Gradient of masks (B, K, h, w), contiguous, in the masks' dtype, from the gradient of the sums (B, 8).
    ``band``: output cells per side of a program (≥ 2, a power of two); None: the launch plan's."""
    batch, num_classes, h, w = masks.shape
    grad_masks = torch.empty((batch, num_classes, h, w), dtype=masks.dtype, device=masks.device)
    if grad_masks.numel() == 0:
        return grad_masks
    _, height, width = labels.shape
    if height * width == 0:  # no pixel reaches the masks
        return grad_masks.zero_()
    plan = seg_head_plan(launch_target(masks.device))
    band = plan.bwd_band if band is None else band
    constexprs = _launch_constexprs(plan, _class_block(num_classes, plan.bwd_block_ks), masks, labels, dice_labels)
    n_k_blocks = triton.cdiv(num_classes, constexprs["BLOCK_K"])
    n_row_bands, n_col_bands = _bands(h, w, band)
    with device_guard(masks.device):  # launch on the tensors' GPU, not the current one
        _seg_head_loss_bwd_kernel[(n_k_blocks * n_row_bands * n_col_bands * batch,)](
            masks, labels, dice_labels, pixel_stats, grad_sums, grad_masks,
            num_classes, h, w, height, width, num_old, ignore_index, n_k_blocks, n_row_bands, n_col_bands,
            *masks.stride(), *labels.stride(), *dice_labels.stride(), *grad_sums.stride(),
            BAND=band, **constexprs,
        )
    return grad_masks


def _launch_teacher(plan, teacher_masks, labels, thresholds, histograms, pseudo, counts, num_classes, num_bins,
                    ignore_index, entropy, histogram, band):
    batch, num_old, h, w = teacher_masks.shape
    _, height, width = labels.shape
    n_row_bands, n_col_bands = _bands(h, w, band)
    # The histogram's tiles compare every pair of their pixels (equal keys counted together): at most
    # plan.histogram_tile_pixels pixels, so the pair matrix stays small.
    constexprs = _launch_constexprs(plan, _class_block(num_old, plan.fwd_block_ks), teacher_masks, labels,
                                    max_tile_pixels=plan.histogram_tile_pixels if histogram else None)
    with device_guard(teacher_masks.device):  # launch on the tensors' GPU, not the current one
        _plop_teacher_kernel[(n_row_bands * n_col_bands * batch,)](
            teacher_masks, labels, thresholds, histograms, pseudo, counts,
            num_old, num_classes, h, w, height, width, num_bins, histograms.shape[0], ignore_index,
            n_row_bands, n_col_bands,
            *teacher_masks.stride(), *labels.stride(), thresholds.stride(0),
            BAND=band, PLOP_ENTROPY=entropy == "plop", HISTOGRAM=histogram, **constexprs,
        )


def entropy_histogram_forward(
    teacher_masks: torch.Tensor, labels: torch.Tensor, num_bins: int, num_classes: int, entropy: str,
    *, band: int | None = None,
) -> torch.Tensor:
    """(K, num_bins) int64 counts of label-0 pixels by teacher prediction and entropy bin."""
    batch, num_old, h, w = teacher_masks.shape
    _, height, width = labels.shape
    plan = seg_head_plan(launch_target(teacher_masks.device))
    band = plan.fwd_band if band is None else band
    n_row_bands, n_col_bands = _bands(h, w, band)
    programs = batch * n_row_bands * n_col_bands if height * width else 0
    # A histogram per program, up to HISTOGRAM_COPIES (see the module docstring), summed in a fixed order.
    histograms = torch.zeros((min(programs, HISTOGRAM_COPIES), num_old, num_bins), dtype=torch.int32,
                             device=teacher_masks.device)
    if programs:
        # The pseudo-label outputs and thresholds are unused here (HISTOGRAM): any tensors of the right device.
        _launch_teacher(plan, teacher_masks, labels, histograms, histograms, histograms, histograms, num_classes,
                        num_bins, 0, entropy, histogram=True, band=band)
    return histograms.sum(0, dtype=torch.int64)


def pseudo_label_forward(
    teacher_masks: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int,
    num_classes: int,
    entropy: str,
    *,
    band: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels (B, H, W) int64, counts (B, 2) int64 = (#label-0 pixels, #pseudo-labelled)) per image."""
    batch, num_old, h, w = teacher_masks.shape
    _, height, width = labels.shape
    plan = seg_head_plan(launch_target(teacher_masks.device))
    band = plan.fwd_band if band is None else band
    n_row_bands, n_col_bands = _bands(h, w, band)
    pseudo = torch.empty((batch, height, width), dtype=torch.int64, device=teacher_masks.device)
    counts = torch.zeros((batch, n_row_bands * n_col_bands, 2), dtype=torch.int32, device=teacher_masks.device)
    if batch * height * width > 0:
        _launch_teacher(plan, teacher_masks, labels, thresholds, counts, pseudo, counts, num_classes, 1,
                        ignore_index, entropy, histogram=False, band=band)
    return pseudo, counts.sum(1, dtype=torch.int64)
