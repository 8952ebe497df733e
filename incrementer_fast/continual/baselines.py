"""The baselines of every CISS table, on this package's ViT + mask transformer: MiB and PLOP.

Both methods are trained as their released code trains them; only the network is ours (Segmenter's ViT +
mask transformer with cosine masks instead of a DeepLab-v3 with a ResNet-101), and the optimiser, schedule,
data pipeline and evaluation are this harness's, the same for every method, so that a comparison isolates
the method. Every departure from the released code is listed in docs/fidelity.md.

**MiB** (Cermelli et al., CVPR 2020; released code ``fcdl94/MiB``) — ``--method mib``. At an incremental
step, with z the student's logits (all K classes), t the previous step's model's (K_old classes) and the
training labels y (the step's classes, 0 elsewhere):

    L = UNCE(z, y; old_cl = K_old) + λ_kd · UNKD(z, t; alpha)

* ``UnbiasedCrossEntropy`` built with ``reduction="none"`` and then ``loss.mean()`` (``train.py``,
  ``Trainer.train``): the mean over EVERY pixel of the batch, void pixels counting 0 — not ``nll_loss``'s
  mean over the labelled ones. ``incrementer_fast.mib_head_loss`` returns the latter, so
  ``mib_losses`` rescales it by (labelled pixels) / (all pixels).
* ``UnbiasedKnowledgeDistillationLoss(alpha=opts.alpha)`` with its default ``reduction="mean"``, no mask.
* Defaults from ``argparser.py``: ``modify_command_options`` sets, for ``--method MiB``, ``loss_kd = 10``
  (λ_kd, ``TrainConfig.mib_lambda_kd``), ``unce = unkd = True`` and ``init_balanced = True``; ``--alpha``
  defaults to 1.0 (``TrainConfig.mib_kd_alpha``).
* Both losses on the bilinear (align_corners=False) upsampling of the logits to the labels' size
  (``segmentation_module.py`` upsamples before any loss): ``mib_head_loss`` computes exactly that without
  building it.
* ``init_balanced`` (``run.py`` → ``init_new_classifier``): the new classifiers copy the background's weight
  and every one of them, and the background, gets the bias b_bg − log(N_new + 1), so that the background's
  old probability is split evenly over itself and the new classes. Our masks are cosines of class tokens
  with no bias: the new class tokens copy the background token (``TrainConfig.new_token_init =
  "background"``), which is what PLOP's code does for its cosine classifier (``init_new_classifier`` with
  ``use_cosine``: the weight copied, no bias), and the bias correction has nothing to act on.
* Every classifier trains at every step (MiB's optimiser takes all of ``model.cls``): the old class tokens
  are trainable for ``mib`` and ``plop`` (``train_every_class_token``), where ``incrementer`` freezes them.
* No pseudo-labels, FOD or CDS.

**PLOP** (Douillard et al., CVPR 2021; released code ``arthurdouillard/CVPR2021_PLOP``) — ``--method plop``:

    L = CE(pseudo-labels) · PLOP's per-image factor, mean over every pixel  +  POD

* ``argparser.py`` for ``--method PLOP``: ``pseudo "entropy"``, ``threshold 0.001``,
  ``classif_adaptive_factor True``, ``pod "local"``, ``pod_factor 0.01``, ``pod_logits True``,
  ``pod_options {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}``,
  ``init_balanced True``; defaults ``spp_scales [1, 2, 4]``, ``pod_prepro "pow"``, the POD schedule on
  (``no_pod_schedule`` False), ``pod_deeplab_mask`` off, ``unce`` off (a plain CE on the pseudo-labels).
* The pseudo-labels, the per-image factor and the CE are ``--method incrementer``'s
  (``incrementer_fast.nn.PLOPPseudoLabeler``, PLOP's entropy and median; ``SegHeadLoss``'s CE with PLOP's
  mean over all pixels), with the new classes' CE weight 1 (PLOP has none) and no dice.
* POD (``train.py``, ``features_distillation`` with ``collapse_channels="local"``, and ``_local_pod``) over
  PLOP's list of maps: the outputs of the 4 ResNet stages (``attentions``), the decoder's pre-logit features
  (``x_pl``) and the patch-resolution logits (``sem_logits_small``). Here: the token maps of
  ``TrainConfig.plop_pod_blocks`` encoder blocks (the prefix tokens dropped, (B, N, D) as (B, D, h, w);
  ``pod_block_indices``), the decoder's patch embeddings (what the cosine masks compare, as (B, D, h, w))
  and the masks. Per map (``local_pod_loss``): both squared (``prepro "pow"``), pooled by ``_local_pod``
  (``local_pod_embedding``), no normalisation (``features_distillation`` sets ``normalize = False``), the
  L2 distance per image averaged over the batch, times the map's factor (0.01; 0.0005 for the logits,
  whose student's new-class channels are first summed into its background, ``extra_channels "sum"``), times
  the schedule √(K_total / K_new); the sum over the maps divided by their number.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import mib_head_loss
from ..constants import IGNORE_INDEX
from ..reference import mib_head_loss as reference_mib_head_loss

DISTILLING_METHODS = ("incrementer", "mib", "plop")
"""The methods whose incremental steps learn from a frozen copy of the previous step's model."""
EVERY_TOKEN_TRAINED_METHODS = ("mib", "plop")
"""The methods whose old classifiers (class tokens) keep training at later steps, as in their code."""
PLOP_POD_SCALES = (1, 2, 4)
"""PLOP's ``--spp_scales`` default: the regions of side w, w/2 and w/4 of ``_local_pod``."""


def train_every_class_token(model) -> None:
    """Make every class token trainable again after ``add_classes`` (which freezes the old ones): MiB's and
    PLOP's optimisers take every classifier, old ones included (their ``run.py``)."""
    for tokens in model.class_tokens:
        tokens.requires_grad_(True)


# ------------------------------------------------------------------------------------ MiB
def mib_losses(config, student_masks: torch.Tensor, labels: torch.Tensor, teacher_masks: torch.Tensor,
               num_old: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiB's (CE, KD) of a micro-batch as its ``Trainer.train`` computes them (see the module docstring).

    Args:
        config: the run's TrainConfig (``mib_kd_alpha``; ``fused_head`` off runs the reference of the op).
        student_masks: (B, K, h, w) patch-resolution logits of the model being trained.
        labels: (B, H, W) the step's training labels (its classes, 0 elsewhere, 255 void).
        teacher_masks: (B, K_old, h, w) the previous step's model's logits.
        num_old: K_old, the classes of the previous steps (background included).

    Returns:
        (ce, kd): UNCE averaged over every pixel of the batch (void ones count 0), UNKD (MiB's mean); the
        training loss is ce + λ_kd · kd.
    """
    loss = mib_head_loss if config.fused_head else reference_mib_head_loss
    unce, unkd = loss(student_masks, labels, num_old, teacher_masks.to(student_masks.dtype),
                      kd_alpha=config.mib_kd_alpha, ignore_index=IGNORE_INDEX)
    # MiB's reduction="none" + .mean(): from the op's mean over the labelled pixels to the mean over all.
    labelled = ((labels >= 0) & (labels < student_masks.shape[1]) & (labels != IGNORE_INDEX)).sum()
    return unce * labelled.to(unce.dtype) / labels.numel(), unkd


# ------------------------------------------------------------------------------------ PLOP's Local POD
def local_pod_embedding(features: torch.Tensor, scales=PLOP_POD_SCALES) -> torch.Tensor:
    """PLOP's ``_local_pod`` of a (B, C, h, w) map (no normalisation, PLOP's default).

    For each scale s, k = w // s (the WIDTH's, on both axes, as PLOP; a remainder is left out), and each of
    the s² regions [i·k, (i+1)·k) × [j·k, (j+1)·k): the region's mean over its columns (C·k values, one per
    row) and over its rows (one per column), flattened per image and concatenated in that order.

    Returns:
        (B, Σ_s s²·2·C·k) embedding.

    Raises ValueError for a map wider than tall, whose bottom regions would be empty (PLOP's maps, and this
    package's training crops, are square).
    """
    batch, channels, height, width = features.shape
    if height < width:
        raise ValueError(f"local POD pools square regions of the width's side: the map must be at least as tall "
                         f"as wide, got (h, w) = ({height}, {width})")
    pooled = []
    for scale in scales:
        side = width // scale
        # The s × s regions at once: (B, C, i, row, j, column); the order of PLOP's loops over (i, j), each
        # region's row means (one per row) before its column means.
        regions = features[..., :scale * side, :scale * side].reshape(batch, channels, scale, side, scale, side)
        row_means = regions.mean(dim=5).permute(0, 2, 4, 1, 3)      # (B, i, j, C, row)
        column_means = regions.mean(dim=3).permute(0, 2, 3, 1, 4)   # (B, i, j, C, column)
        pooled.append(torch.stack([row_means, column_means], dim=3).reshape(batch, -1))
    return torch.cat(pooled, dim=1)


def merge_new_into_background(student_logits: torch.Tensor, num_old: int) -> torch.Tensor:
    """PLOP's ``extra_channels "sum"``: the student's (B, K, h, w) logits with its new-class channels summed
    into the background channel and then dropped → (B, K_old, h, w), the teacher's shape."""
    background = student_logits[:, :1] + student_logits[:, num_old:].sum(dim=1, keepdim=True)
    return torch.cat([background, student_logits[:, 1:num_old]], dim=1)


def local_pod_loss(teacher_maps: list[torch.Tensor], student_maps: list[torch.Tensor], factors: list[float],
                   num_classes: int, num_new: int, scales=PLOP_POD_SCALES) -> torch.Tensor:
    """PLOP's ``features_distillation`` (``collapse_channels="local"``, ``prepro "pow"``, no normalisation,
    the POD schedule) over maps of equal shapes per layer.

    Args:
        teacher_maps, student_maps: per layer a (B, C, h, w) map of the previous model and of the student
            (the student's logits already merged by ``merge_new_into_background``).
        factors: per layer its pod factor.
        num_classes, num_new: PLOP's ``nb_current_classes`` (K_total, background included) and
            ``nb_new_classes``, for the schedule √(K_total / K_new).
        scales: PLOP's ``spp_scales``.

    Returns:
        0-dim Σ_ℓ factor_ℓ · √(K_total / K_new) · mean_b ‖emb(a²) − emb(b²)‖₂, divided by the layer
        count.
    """
    schedule = math.sqrt(num_classes / num_new)
    total = teacher_maps[0].new_zeros(())
    for teacher, student, factor in zip(teacher_maps, student_maps, factors, strict=True):
        difference = (local_pod_embedding(teacher.pow(2), scales)
                      - local_pod_embedding(student.pow(2), scales))
        total = total + factor * torch.linalg.vector_norm(difference, dim=-1).mean() * schedule
    return total / len(teacher_maps)


def pod_block_indices(num_blocks: int, count: int) -> list[int]:
    """The encoder blocks (0-based) whose token maps POD distils: the last of each of ``min(count,
    num_blocks)`` equal groups of the blocks (blocks 2, 5, 8, 11 of ViT-B's 12 for 4; all of the demo's 4)."""
    count = min(count, num_blocks)
    return [math.ceil((group + 1) * num_blocks / count) - 1 for group in range(count)]


def token_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h·w, D) patch tokens in row-major order → the (B, D, h, w) map PLOP's POD pools."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class BlockTokenMaps:
    """Forward hooks on encoder blocks that keep their latest outputs, for PLOP's POD.

    Args:
        encoder: a timm ViT (``blocks``, ``num_prefix_tokens``).
        indices: the blocks to watch (``pod_block_indices``).
    """

    def __init__(self, encoder, indices: list[int]):
        self.num_prefix_tokens = encoder.num_prefix_tokens
        self._outputs: list[Optional[torch.Tensor]] = [None] * len(indices)
        self._handles = [encoder.blocks[index].register_forward_hook(self._keeper(slot))
                         for slot, index in enumerate(indices)]

    def _keeper(self, slot: int):
        def keep(module, inputs, output):
            self._outputs[slot] = output
        return keep

    def maps(self, h: int, w: int) -> list[torch.Tensor]:
        """The watched blocks' outputs of the last forward pass as (B, D, h, w) float32 maps (prefix tokens
        dropped); the references are released."""
        if any(output is None for output in self._outputs):
            raise RuntimeError("BlockTokenMaps.maps() before a forward pass of the encoder")
        maps = [token_map(output[:, self.num_prefix_tokens:].float(), h, w) for output in self._outputs]
        self._outputs = [None] * len(self._outputs)
        return maps

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def plop_pod(config, student, teacher, student_blocks: list[torch.Tensor], teacher_blocks: list[torch.Tensor],
             num_old: int) -> torch.Tensor:
    """PLOP's POD of a micro-batch (see the module docstring).

    Args:
        config: the run's TrainConfig (``plop_pod_factor``, ``plop_pod_logits_factor``).
        student, teacher: the model outputs (``masks``, ``patch_embeddings``).
        student_blocks, teacher_blocks: the encoder blocks' (B, D, h, w) token maps (``BlockTokenMaps``).
        num_old: K_old.

    Returns:
        0-dim float32 POD loss (already weighted: PLOP adds it to the CE as it is).
    """
    batch, num_classes, h, w = student.masks.shape
    teacher_layers = [*teacher_blocks, token_map(teacher.patch_embeddings.float(), h, w), teacher.masks.float()]
    student_layers = [*student_blocks, token_map(student.patch_embeddings.float(), h, w),
                      merge_new_into_background(student.masks.float(), num_old)]
    factors = [config.plop_pod_factor] * (len(student_layers) - 1) + [config.plop_pod_logits_factor]
    return local_pod_loss(teacher_layers, student_layers, factors, num_classes, num_classes - num_old)
