"""Masks stay float32 under bf16 autocast.

Under autocast the decoder's embeddings are bf16. Rounded to bf16, logits near ±γ = ±10 would move in steps
of 2^-4 before the CE, the dice and PLOP's entropy; the model asks ``cosine_mask`` for float32 masks, and
the op computes them in float32 even inside an autocast region. Bounds, on this tiny model (measured
values in brackets, 2-core CPU):

* the autocast masks equal the float32 cosine of the (bf16) embeddings to float32 rounding: rel ≤ 1e-6 [0];
* a bf16-autocast step's CE and dice are within 1e-2 relative of the same step in float32 [2e-4, 8e-5],
  and its FOD terms, against a float32 teacher, within 1e-3 absolute of the float32 step's [2e-5]: the
  remaining difference is the bf16 encoder, not the masks.
"""
import torch

import incrementer_fast as inc


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bf16_autocast_step_keeps_float32_masks_and_the_losses():
    torch.manual_seed(0)
    model = inc.Incrementer("test_vit", 5, d_model=64, attention="sdpa")
    model.add_classes(3)
    with torch.no_grad():  # tokens far apart, so that the logits span most of [-γ, γ]
        for tokens in model.class_tokens:
            tokens.normal_()
    model.eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 48, generator=generator)
    labels = torch.randint(0, 8, (2, 64, 48), generator=generator)

    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(images)
    assert amp.patch_embeddings.dtype == torch.bfloat16  # autocast is really on
    assert amp.masks.dtype == full.masks.dtype == torch.float32
    upcast = inc.cosine_mask(amp.patch_embeddings.float(), amp.class_embeddings.float(), scale=model.gamma)
    assert rel(amp.masks.flatten(2), upcast) <= 1e-6
    assert not torch.equal(amp.masks, amp.masks.bfloat16().float())  # not bf16 values in a float32 tensor

    ce_full, dice_full = inc.seg_head_loss(full.masks, labels, 5, new_class_weight=0.5)
    ce_amp, dice_amp = inc.seg_head_loss(amp.masks, labels, 5, new_class_weight=0.5)
    assert abs(ce_amp - ce_full) <= 1e-2 * ce_full and abs(dice_amp - dice_full) <= 1e-2 * dice_full
    weights = torch.ones(full.patch_embeddings.shape[:2])
    teacher = full.patch_embeddings  # a float32 teacher: FOD of the step against it
    fod_full = inc.fod_loss(full.patch_embeddings, teacher, weights)
    fod_amp = inc.fod_loss(amp.patch_embeddings.float(), teacher, weights)
    assert abs(float(fod_full)) <= 1e-6 and 0.0 <= float(fod_amp) <= 1e-3
    fod_class = inc.fod_loss(amp.class_embeddings[:, :5].float(), full.class_embeddings[:, :5],
                             torch.ones(2, 5))
    assert 0.0 <= float(fod_class) <= 1e-3
