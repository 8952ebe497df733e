"""``--method mib`` and ``--method plop`` (incrementer_fast/continual/baselines.py) against transcriptions of
their released code, written here from reading fcdl94/MiB (``train.py``, ``utils/loss.py``) and
arthurdouillard/CVPR2021_PLOP (``train.py``: ``features_distillation``, ``_local_pod``), and their wiring in a
training step. (That they train the synthetic scenario and keep old classes better than fine-tuning is
tests/test_training.py's demo test, which runs them beside incrementer and finetune.)"""
import math

import pytest
import torch
import torch.nn.functional as F

from incrementer_fast.continual.baselines import (BlockTokenMaps, local_pod_loss, merge_new_into_background,
                                                  pod_block_indices, train_every_class_token)
from incrementer_fast.continual.config import TrainConfig
from incrementer_fast.continual.train import compute_losses, make_pseudo_labeler
from incrementer_fast.model import IncrementerOutput


# ------------------------------------------------------------------ transcriptions of the released code
def plop_local_pod_transcribed(x, spp_scales=(1, 2, 4)):
    """PLOP's ``_local_pod`` with ``normalize=False, normalize_per_scale=False``: per scale the side is the
    width over the scale, each square region yields its per-row and per-column means."""
    w = x.shape[-1]
    parts = []
    for scale in spp_scales:
        k = w // scale
        for row in range(scale):
            for col in range(scale):
                window = x[:, :, row * k:row * k + k, col * k:col * k + k]
                parts.append((window.sum(dim=-1) / window.shape[-1]).flatten(1))   # mean over the columns
                parts.append((window.sum(dim=-2) / window.shape[-2]).flatten(1))   # mean over the rows
    return torch.cat(parts, dim=1)


def plop_features_distillation_transcribed(old_maps, new_maps, index_new_class, nb_current_classes,
                                           nb_new_classes, pod_factor=0.01, last_factor=0.0005):
    """PLOP's ``features_distillation`` as ``--method PLOP`` calls it: ``collapse_channels="local"``,
    ``pod_options={"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}``,
    prepro "pow", normalize forced off, no deeplab mask, frobenius distance, the POD schedule."""
    loss = torch.zeros((), dtype=old_maps[0].dtype)
    last = len(old_maps) - 1
    for i, (a, b) in enumerate(zip(old_maps, new_maps)):
        factor = pod_factor if i < last else last_factor
        if a.shape[1] != b.shape[1]:  # only the logits: the student's extra channels summed into channel 0
            merged = torch.zeros_like(a)
            merged[:, 0] = b[:, 0] + b[:, index_new_class:].sum(dim=1)
            merged[:, 1:] = b[:, 1:index_new_class]
            b = merged
        a = plop_local_pod_transcribed(a ** 2)
        b = plop_local_pod_transcribed(b ** 2)
        layer_loss = ((a - b) ** 2).sum(dim=-1).sqrt().mean()
        loss = loss + factor * layer_loss * math.sqrt(nb_current_classes / nb_new_classes)
    return loss / len(old_maps)


def mib_trainer_loss_transcribed(outputs, labels, outputs_old, old_cl, loss_kd=10.0, alpha=1.0):
    """MiB's ``Trainer.train`` loss on full-resolution logits: ``UnbiasedCrossEntropy(reduction="none")``
    then ``.mean()``, plus ``loss_kd`` × ``UnbiasedKnowledgeDistillationLoss(alpha)`` (reduction mean)."""
    den = torch.logsumexp(outputs, dim=1)
    log_probs = torch.zeros_like(outputs)
    log_probs[:, 0] = torch.logsumexp(outputs[:, :old_cl], dim=1) - den
    log_probs[:, old_cl:] = outputs[:, old_cl:] - den[:, None]
    target = labels.clone()
    target[labels < old_cl] = 0
    ce = F.nll_loss(log_probs, target, ignore_index=255, reduction="none").mean()

    new_cl = outputs.shape[1] - outputs_old.shape[1]
    soft = torch.softmax(outputs_old * alpha, dim=1)
    background_idx = torch.tensor([0] + list(range(outputs_old.shape[1], outputs.shape[1])))
    out_bkg = torch.logsumexp(outputs.index_select(1, background_idx), dim=1) - den
    out_old = outputs[:, 1:-new_cl] - den[:, None]
    kd = -((soft[:, 0] * out_bkg + (soft[:, 1:] * out_old).sum(dim=1)) / outputs_old.shape[1]).mean()
    return ce + loss_kd * kd


def upsample(masks, size):
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)


def outputs(masks, patch_embeddings=None, patch_size=4):
    batch, num_classes, h, w = masks.shape
    if patch_embeddings is None:
        patch_embeddings = torch.zeros(batch, h * w, 3, dtype=masks.dtype)
    return IncrementerOutput(masks, patch_embeddings, torch.zeros(batch, num_classes, 3, dtype=masks.dtype),
                             (h * patch_size, w * patch_size), patch_size)


# ------------------------------------------------------------------ PLOP's POD
@pytest.mark.parametrize("h, w", [(4, 4), (6, 5), (7, 6)])  # square; taller, w % 4 ≠ 0: PLOP's remainders
def test_local_pod_equals_plop_transcription_values_and_gradients(h, w):
    torch.manual_seed(h * 10 + w)
    num_old, num_classes = 3, 5
    teacher = [torch.randn(2, 7, h, w, dtype=torch.float64) for _ in range(3)]
    teacher.append(torch.randn(2, num_old, h, w, dtype=torch.float64))
    student = [(t + 0.3 * torch.randn_like(t)).requires_grad_() for t in teacher[:3]]
    student.append(torch.randn(2, num_classes, h, w, dtype=torch.float64, requires_grad=True))

    expected = plop_features_distillation_transcribed(teacher, student, num_old, num_classes, num_classes - num_old)
    layers = student[:3] + [merge_new_into_background(student[3], num_old)]
    got = local_pod_loss(teacher, layers, [0.01, 0.01, 0.01, 0.0005], num_classes, num_classes - num_old)
    assert float(expected.detach()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    expected_grads = torch.autograd.grad(expected, student)
    got_grads = torch.autograd.grad(got, student)
    for e, g in zip(expected_grads, got_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-15)


def test_local_pod_refuses_a_map_wider_than_tall():
    """PLOP's regions have the width's side on both axes: a wider map would pool empty regions (NaN)."""
    wide = torch.randn(1, 2, 4, 6)
    with pytest.raises(ValueError, match=r"at least as tall as wide, got \(h, w\) = \(4, 6\)"):
        local_pod_loss([wide], [wide], [1.0], 3, 1)


def test_pod_blocks_are_evenly_spaced_and_end_at_the_last_block():
    assert pod_block_indices(12, 4) == [2, 5, 8, 11]
    assert pod_block_indices(4, 4) == [0, 1, 2, 3]
    assert pod_block_indices(4, 6) == [0, 1, 2, 3]  # capped at the encoder's blocks
    assert pod_block_indices(12, 1) == [11]


def test_block_token_maps_are_the_blocks_outputs_as_maps():
    from incrementer_fast.model import Incrementer

    model = Incrementer(backbone="vit_demo_patch8", num_classes=3, img_size=16, pretrained=False, n_layers=1)
    indices = pod_block_indices(len(model.encoder.blocks), 2)
    hooks = BlockTokenMaps(model.encoder, indices)
    images = torch.randn(2, 3, 16, 24)
    with pytest.raises(RuntimeError, match="before a forward"):
        hooks.maps(2, 3)
    with torch.no_grad():
        model(images)
        maps = hooks.maps(2, 3)
        hooks.remove()
        x = model.encoder.patch_embed(images)
        x = model.encoder.norm_pre(model.encoder.patch_drop(model.encoder._pos_embed(x)))
        expected = []
        for index, block in enumerate(model.encoder.blocks):
            x = block(x)
            if index in indices:
                expected.append(x[:, model.encoder.num_prefix_tokens:].reshape(2, 2, 3, -1).permute(0, 3, 1, 2))
    assert len(maps) == 2 and all(m.shape == (2, 192, 2, 3) for m in maps)
    for m, e in zip(maps, expected):
        torch.testing.assert_close(m, e)
    assert hooks._outputs == [None, None]  # removed: the blocks' forwards above were not kept


# ------------------------------------------------------------------ the training losses
def test_mib_training_loss_equals_mibs_trainer():
    """compute_losses for mib = MiB's CE (mean over every pixel, void ones counting 0) + 10 · UNKD, on the
    upsampled logits, in float64."""
    torch.manual_seed(0)
    num_old, num_classes = 4, 6
    masks = torch.randn(2, num_classes, 3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, num_old, 3, 4, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (2, 12, 16))
    labels[labels.remainder(3) == 1] = 0  # the step's labels: background and new classes ...
    labels[:, :2] = 255                   # ... and void
    labels[labels.eq(1) | labels.eq(2) | labels.eq(3)] = 0
    config = TrainConfig.demo(method="mib")
    terms = compute_losses(config, outputs(masks), labels, num_old=num_old, patch_size=4, teacher=outputs(teacher))
    expected = mib_trainer_loss_transcribed(upsample(masks, (12, 16)), labels, upsample(teacher, (12, 16)), num_old)
    torch.testing.assert_close(terms.total.double(), expected, rtol=1e-10, atol=0)
    assert float(terms.kd.detach()) != 0 and float(terms.dice) == float(terms.pod) == float(terms.fod_visual) == 0
    got_grad, = torch.autograd.grad(terms.total, masks)
    expected_grad, = torch.autograd.grad(expected, masks)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-9, atol=1e-15)


def test_plop_training_loss_is_ce_on_pseudo_labels_plus_pod():
    """compute_losses for plop = the pseudo-labels' CE with unit class weights and PLOP's image factor, plus
    POD over the block maps, the patch embeddings and the masks (PLOP's list order: features, then logits)."""
    torch.manual_seed(1)
    num_old, num_classes, h, w = 3, 5, 4, 4
    config = TrainConfig.demo(method="plop", fused_head=False)
    teacher = outputs(torch.randn(2, num_old, h, w, dtype=torch.float64), torch.randn(2, h * w, 6, dtype=torch.float64))
    student = outputs(torch.randn(2, num_classes, h, w, dtype=torch.float64),
                      torch.randn(2, h * w, 6, dtype=torch.float64))
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 4:8, 4:8] = 3
    labeler = make_pseudo_labeler(config, num_classes)
    labeler.update(teacher.masks.float(), labels)
    labeler.compute_thresholds()
    blocks = ([torch.randn(2, 8, h, w, dtype=torch.float64)], [torch.randn(2, 8, h, w, dtype=torch.float64)])
    terms = compute_losses(config, student, labels, num_old=num_old, patch_size=4, teacher=teacher,
                           pseudo_labeler=labeler, block_maps=blocks)
    pseudo, factor = labeler(teacher.masks.float(), labels)
    logits = upsample(student.masks, (16, 16))
    pixel_ce = F.cross_entropy(logits, pseudo, ignore_index=255, reduction="none")
    expected_ce = (factor.double()[:, None, None] * pixel_ce).mean()  # PLOP: factor · CE, mean over all pixels
    as_map = lambda e: e.transpose(1, 2).reshape(2, 6, h, w)  # noqa: E731
    expected_pod = plop_features_distillation_transcribed(
        [blocks[1][0], as_map(teacher.patch_embeddings), teacher.masks],
        [blocks[0][0], as_map(student.patch_embeddings), student.masks], num_old, num_classes, num_classes - num_old)
    torch.testing.assert_close(terms.ce.double(), expected_ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms.pod.double(), expected_pod, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms.total, terms.ce + terms.pod)
    assert float(terms.kd) == float(terms.dice) == float(terms.fod_visual) == float(terms.fod_class) == 0
    with pytest.raises(ValueError, match="block_maps"):
        compute_losses(config, student, labels, num_old=num_old, patch_size=4, teacher=teacher,
                       pseudo_labeler=labeler)


def test_every_class_token_trains_again_after_add_classes():
    from incrementer_fast.model import Incrementer

    model = Incrementer(backbone="vit_demo_patch8", num_classes=3, img_size=16, pretrained=False, n_layers=1,
                        new_token_init="background")
    model.add_classes(2)
    assert [t.requires_grad for t in model.class_tokens] == [False, True]
    train_every_class_token(model)
    assert all(t.requires_grad for t in model.class_tokens)
    torch.testing.assert_close(model.class_tokens[1], model.class_tokens[0][:1].expand(2, -1))  # MiB's init
