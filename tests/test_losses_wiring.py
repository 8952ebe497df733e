"""Wiring of the training loss (incrementer_fast/continual/train.py: compute_losses).

Each term's gradient must reach exactly the parameters it should: FOD on the visual tokens reaches the
patch projection but not the class projection, FOD on the class embeddings the reverse; CE and dice reach
the new class tokens and the encoder; frozen (old) class tokens and the teacher get nothing. The fused ops
and the plain-PyTorch references (``fused_head=False``) must give the same loss and gradients, and the
pseudo-labels must be PLOP's rule applied to the teacher, with thresholds computed over the step's images.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import incrementer_fast as inc
from incrementer_fast.continual.config import TrainConfig
from incrementer_fast.continual.train import (DistEnv, LossTerms, compute_losses, make_pseudo_labeler,
                                              step_pseudo_labeler)
from incrementer_fast.model import Incrementer, IncrementerOutput
from incrementer_fast.reference.seg_head import teacher_prediction

from helpers import REL_ERR_BOUND, rel_err

NUM_OLD = 3  # background + 2 classes at step 0
NUM_NEW = 2
SIZE = 32  # 2 × 2 patches of 16 pixels


def tiny_config(**overrides) -> TrainConfig:
    values = dict(dataset="synthetic", backbone="vit_tiny_patch16_224", img_size=SIZE, crop_size=SIZE,
                  val_size=SIZE, device="cpu", num_workers=0, lambda_visual=0.7, lambda_class=0.3,
                  lambda_dice=0.5, new_class_weight=2.0, fod_bg_weight=0.25)
    values.update(overrides)
    return TrainConfig(**values)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    """(student at step 1, teacher = frozen step-0 model), dropout off so two forwards agree."""
    torch.manual_seed(0)
    model = Incrementer("vit_tiny_patch16_224", NUM_OLD, img_size=SIZE, dropout=0.0)
    with torch.no_grad():  # move the step-0 model away from its init, so the teacher is not trivial
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    teacher = model.frozen_copy()
    model.add_classes(NUM_NEW)
    model.train()
    return model, teacher


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    # Training labels of step 1: background 0, new classes 3 and 4, a few ignored pixels.
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    labels[0, :16, :16] = 3
    labels[1, 16:, 16:] = 4
    labels[0, 20:22, :] = 255
    return images, labels


def pseudo_labeler(config, thresholds):
    """The step's labeler as the trainer builds it, with given thresholds instead of computed ones."""
    labeler = make_pseudo_labeler(config, NUM_OLD + NUM_NEW)
    labeler.thresholds = thresholds
    return labeler


def losses(config, models, batch, thresholds=None):
    model, teacher = models
    images, labels = batch
    with torch.no_grad():
        teacher_out = teacher(images)
    if thresholds is None:
        # Thresholds above every entropy (≤ 1 normalised, far less in PLOP's scale): every background pixel
        # takes the teacher's prediction, so no image factor zeroes the CE of this near-random teacher.
        thresholds = torch.full((NUM_OLD,), 2.0)
    student_out = model(images)
    terms = compute_losses(config, student_out, labels, num_old=NUM_OLD, patch_size=model.patch_size,
                           teacher=teacher_out, pseudo_labeler=pseudo_labeler(config, thresholds))
    return terms, student_out, teacher_out


def named_grads(model, loss):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: g for n, g in zip(params, grads)}


def norm(grads, prefix):
    selected = [g for n, g in grads.items() if n.startswith(prefix) and g is not None]
    return sum(float(g.norm()) for g in selected)


def test_each_term_reaches_the_parameters_it_should(models, batch):
    model, teacher = models
    terms, _, _ = losses(tiny_config(), models, batch)
    new_tokens = f"class_tokens.{len(model.class_tokens) - 1}"
    for name in ("ce", "dice", "fod_visual", "fod_class"):
        value = getattr(terms, name)
        assert value.requires_grad and float(value.detach()) > 0, f"{name} = {float(value.detach())} is no signal"
    ce = named_grads(model, terms.ce)
    dice = named_grads(model, terms.dice)
    fod_visual = named_grads(model, terms.fod_visual)
    fod_class = named_grads(model, terms.fod_class)
    # Segmentation terms train everything that makes the masks: encoder, decoder, new tokens, both projections.
    for grads, what in ((ce, "ce"), (dice, "dice")):
        for prefix in ("encoder.", "proj_dec", "blocks.", new_tokens, "proj_patch", "proj_classes"):
            assert norm(grads, prefix) > 0, f"{what} does not reach {prefix}"
    # FOD on visual tokens: the patch embeddings use proj_patch, never proj_classes.
    assert norm(fod_visual, "encoder.") > 0 and norm(fod_visual, "proj_patch") > 0
    assert fod_visual["proj_classes"] is None or float(fod_visual["proj_classes"].abs().max()) == 0
    # FOD on old class embeddings: proj_classes and the decoder, never proj_patch.
    assert norm(fod_class, "proj_classes") > 0 and norm(fod_class, "blocks.") > 0
    assert fod_class["proj_patch"] is None or float(fod_class["proj_patch"].abs().max()) == 0


def test_frozen_tokens_and_teacher_get_no_gradient(models, batch):
    model, teacher = models
    assert not model.class_tokens[0].requires_grad
    terms, _, teacher_out = losses(tiny_config(), models, batch)
    assert not teacher_out.masks.requires_grad and not teacher_out.patch_embeddings.requires_grad
    terms.total.backward()
    try:
        assert model.class_tokens[0].grad is None
        assert model.class_tokens[1].grad is not None and float(model.class_tokens[1].grad.norm()) > 0
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    finally:
        model.zero_grad(set_to_none=True)


def test_total_is_the_weighted_sum_and_switches_drop_terms(models, batch):
    config = tiny_config()
    torch.manual_seed(0)
    full, _, _ = losses(config, models, batch)
    expected = full.ce + 0.5 * full.dice + 0.7 * full.fod_visual + 0.3 * full.fod_class
    torch.testing.assert_close(full.total, expected)
    no_fod, _, _ = losses(dataclasses.replace(config, use_fod=False), models, batch)
    torch.testing.assert_close(no_fod.total, no_fod.ce + 0.5 * no_fod.dice)
    no_cds, _, _ = losses(dataclasses.replace(config, use_cds=False), models, batch)
    torch.testing.assert_close(no_cds.total, no_cds.ce + 0.7 * no_cds.fod_visual + 0.3 * no_cds.fod_class)


def test_without_teacher_the_loss_is_plain_cross_entropy(models, batch):
    model, _ = models
    images, labels = batch
    out = model(images)
    terms = compute_losses(tiny_config(), out, labels, num_old=NUM_OLD, patch_size=16)
    logits = F.interpolate(out.masks, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    # PLOP's normalisation: the mean over every pixel, the ignored ones counting as 0.
    expected = F.cross_entropy(logits, labels, ignore_index=255, reduction="none").mean()
    torch.testing.assert_close(terms.total, expected)
    assert float(terms.dice) == float(terms.fod_visual) == float(terms.fod_class) == 0.0
    assert set(LossTerms.NAMES) == {"total", "ce", "dice", "fod_visual", "fod_class", "kd", "pod"}


def plop_ce(logits, targets, weight):
    """PLOP's CE: per-pixel weighted CE, ignored pixels 0, mean over all pixels."""
    return F.cross_entropy(logits, targets, weight=weight, ignore_index=255, reduction="none").mean()


def test_pseudo_labels_and_fod_weights_follow_plop(models, batch):
    """Thresholds above every entropy (every teacher prediction confident): background pixels take the teacher's
    prediction, so CE is the weighted CE against those targets; FOD's token weights come from the same
    pseudo-labels; the dice's masks from the training labels."""
    model, teacher = models
    images, labels = batch
    config = tiny_config(plop_image_factor=False)
    terms, student_out, teacher_out = losses(config, models, batch, thresholds=torch.full((NUM_OLD,), 2.0))
    prediction, _ = teacher_prediction(teacher_out.masks, labels.shape[-2:], num_classes=NUM_OLD + NUM_NEW)
    pseudo = torch.where(labels == 0, prediction, labels)
    logits = F.interpolate(student_out.masks, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    weight = torch.tensor([1.0] * NUM_OLD + [2.0] * NUM_NEW)
    torch.testing.assert_close(terms.ce, plop_ce(logits, pseudo, weight))
    token_weights = inc.fod_token_weights(pseudo, NUM_OLD, 16, 0.25)
    torch.testing.assert_close(
        terms.fod_visual, inc.fod_loss(student_out.patch_embeddings, teacher_out.patch_embeddings, token_weights))
    # Thresholds at 0: no background pixel is confident, all of them are ignored by the CE — but they stay in
    # the dice's M_old, which comes from the training labels.
    low, student_out, _ = losses(config, models, batch, thresholds=torch.zeros(NUM_OLD))
    logits = F.interpolate(student_out.masks, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    only_new = torch.where(labels == 0, 255, labels)
    torch.testing.assert_close(low.ce, plop_ce(logits, only_new, weight))
    torch.testing.assert_close(low.dice, inc.cds_dice_loss(logits, labels, NUM_OLD))
    assert abs(float(low.dice.detach()) - float(inc.cds_dice_loss(logits, only_new, NUM_OLD).detach())) > 1e-3


def _spies(monkeypatch, names=("seg_head_loss", "pseudo_label")):
    """Count the calls of the dispatching ops (``inc.ops.X``) and of their references (``inc.reference.X``)."""
    calls = {"ops": [], "reference": []}
    for kind, namespace in (("ops", inc.ops), ("reference", inc.reference)):
        for name in names:
            real = getattr(namespace, name)

            def counted(*args, _real=real, _name=name, _calls=calls[kind], **kwargs):
                _calls.append(_name)
                return _real(*args, **kwargs)

            monkeypatch.setattr(namespace, name, counted)
    return calls


@pytest.mark.parametrize("image_factor", [True, False])
def test_fused_and_reference_paths_agree(models, batch, image_factor, monkeypatch):
    """``fused_head=False`` runs ``inc.reference.seg_head_loss`` and ``inc.reference.pseudo_label`` (and no
    dispatching seg-head op); the default runs the ops; the two agree within fp32 rounding."""
    model, _ = models
    calls = _spies(monkeypatch)
    results = {}
    for fused in (True, False):
        config = tiny_config(fused_head=fused, plop_image_factor=image_factor)
        terms, _, _ = losses(config, models, batch)
        grads = named_grads(model, terms.total)
        results[fused] = (terms, grads)
        ran, other = ("ops", "reference") if fused else ("reference", "ops")
        assert sorted(calls[ran]) == ["pseudo_label", "seg_head_loss"] and calls[other] == [], (fused, calls)
        calls[ran].clear()
    (fused_terms, fused_grads), (ref_terms, ref_grads) = results[True], results[False]
    for name in LossTerms.NAMES:
        assert rel_err(getattr(fused_terms, name), getattr(ref_terms, name)) <= REL_ERR_BOUND[torch.float32], name
    for name, grad in ref_grads.items():
        if grad is not None:
            assert rel_err(fused_grads[name], grad) <= 1e-4, name


def _outputs(num_classes, dtype, seed=0):
    """Model outputs of a 2-image batch of 32² (2 × 2 patches of 16), made up: what compute_losses reads."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randn(2, num_classes, 2, 2, generator=g, dtype=dtype, requires_grad=True)
    patches = torch.randn(2, 4, 8, generator=g, dtype=dtype, requires_grad=True)
    classes = torch.randn(2, num_classes, 8, generator=g, dtype=dtype, requires_grad=True)
    return IncrementerOutput(masks, patches, classes, (SIZE, SIZE), 16)


@pytest.mark.parametrize("fused", [True, False])
def test_plain_cross_entropy_keeps_float64_and_ignores_labels_out_of_range(fused, monkeypatch):
    """The teacher-less CE on both paths: float64 masks give a float64 loss, and a label outside the
    classes is ignored as 255 is (the seg-head spec), also by the reference."""
    calls = _spies(monkeypatch, names=("seg_head_loss",))
    config = tiny_config(fused_head=fused)
    labels = torch.randint(0, NUM_OLD, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(2))
    out_of_range, ignored = labels.clone(), labels.clone()
    out_of_range[0, :4], ignored[0, :4] = NUM_OLD + 6, 255
    for dtype in (torch.float32, torch.float64):
        student = _outputs(NUM_OLD, dtype)
        terms = compute_losses(config, student, out_of_range, num_old=NUM_OLD, patch_size=16)
        assert terms.ce.dtype == dtype
        expected = compute_losses(config, student, ignored, num_old=NUM_OLD, patch_size=16)
        torch.testing.assert_close(terms.ce, expected.ce, rtol=0, atol=0)
    assert len(calls["ops" if fused else "reference"]) == 4 and not calls["reference" if fused else "ops"]


@pytest.mark.parametrize("fused", [True, False])
def test_with_a_teacher_labels_out_of_range_are_ignored(fused):
    """A training label outside the step's classes is ignored by the CE and the dice, on both paths (as the
    seg-head spec says; ``F.cross_entropy`` alone would raise on it)."""
    config = tiny_config(fused_head=fused)
    num_classes = NUM_OLD + NUM_NEW
    student, teacher = _outputs(num_classes, torch.float32, seed=0), _outputs(NUM_OLD, torch.float32, seed=1)
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    labels[:, :16] = NUM_OLD
    out_of_range, ignored = labels.clone(), labels.clone()
    out_of_range[1, 20:], ignored[1, 20:] = num_classes + 2, 255
    labeler = pseudo_labeler(config, torch.full((NUM_OLD,), 2.0))
    got, expected = (compute_losses(config, student, y, num_old=NUM_OLD, patch_size=16, teacher=teacher,
                                    pseudo_labeler=labeler) for y in (out_of_range, ignored))
    torch.testing.assert_close(got.ce, expected.ce, rtol=0, atol=0)
    torch.testing.assert_close(got.dice, expected.dice, rtol=0, atol=0)


def test_compute_losses_with_a_teacher_needs_the_pseudo_labeler():
    student, teacher = _outputs(NUM_OLD + NUM_NEW, torch.float32), _outputs(NUM_OLD, torch.float32)
    with pytest.raises(ValueError, match="pseudo-labeler"):
        compute_losses(tiny_config(), student, torch.zeros(2, SIZE, SIZE, dtype=torch.long), num_old=NUM_OLD,
                       patch_size=16, teacher=teacher)


class _Images(torch.utils.data.Dataset):
    """Fixed (image, label) pairs of step 1's classes (labels of the full dataset: 1, 2 old, 3, 4 new)."""

    def __init__(self, count):
        g = torch.Generator().manual_seed(3)
        self.items = [(torch.randn(3, SIZE, SIZE, generator=g), torch.randint(0, 5, (SIZE, SIZE), generator=g))
                      for _ in range(count)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


@pytest.mark.parametrize("fused", [True, False])
def test_step_pseudo_labeler_sums_the_histograms_of_the_step_images(models, fused, monkeypatch):
    """The thresholds come from the labeler's histogram of every training image through the teacher, by the
    ops or (``fused_head=False``) by their references; a process with no image of its own starts from a
    zero histogram (it still joins the sum under DDP)."""
    _, teacher = models
    task = [[0, 1, 2], [3, 4]]
    dataset = _Images(5)
    config = tiny_config(fused_head=fused, eval_batch_size=2)
    calls = _spies(monkeypatch, names=("entropy_histogram", "plop_thresholds"))
    labeler = step_pseudo_labeler(teacher, dataset, config=config, task=task, step=1, device=torch.device("cpu"),
                                  env=DistEnv())
    ran, other = ("ops", "reference") if fused else ("reference", "ops")
    assert calls[ran].count("entropy_histogram") == 3 and calls[ran].count("plop_thresholds") == 1
    assert calls[other] == []
    assert labeler.num_classes == NUM_OLD + NUM_NEW and labeler.reference is not fused
    with torch.no_grad():
        teacher_masks = teacher(torch.stack([image for image, _ in dataset.items])).masks
    labels = torch.stack([label for _, label in dataset.items])
    labels = torch.where(labels >= NUM_OLD, labels, 0)  # remap_train_labels: old classes are background
    histogram = inc.reference.entropy_histogram(teacher_masks, labels, 100, num_classes=NUM_OLD + NUM_NEW)
    assert torch.equal(labeler.histogram, histogram)
    torch.testing.assert_close(labeler.thresholds, inc.reference.plop_thresholds(histogram, 0.001), rtol=0, atol=0)

    idle = step_pseudo_labeler(teacher, _Images(1), config=config, task=task, step=1, device=torch.device("cpu"),
                               env=DistEnv(rank=1, world_size=2))
    assert torch.equal(idle.histogram, torch.zeros(NUM_OLD, 100, dtype=torch.int64))
    assert torch.equal(idle.thresholds, torch.full((NUM_OLD,), 0.001))
