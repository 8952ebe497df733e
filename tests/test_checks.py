"""Validation shared by the ops: an ignore_index the labels' dtype cannot hold is an error, not a wrap."""
import pytest
import torch

import incrementer_fast as inc


def test_ignore_index_outside_label_dtype_is_rejected():
    logits = torch.randn(1, 4, 3, 3)
    labels = torch.zeros(1, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"ignore_index=-1 .*torch\.uint8"):
        inc.cds_dice_loss(logits, labels, num_old=2, ignore_index=-1)
    with pytest.raises(ValueError, match=r"ignore_index=300 .*torch\.uint8"):
        inc.fod_token_weights(torch.zeros(1, 4, 4, dtype=torch.uint8), num_old=2, patch_size=2, bg_weight=0.5,
                              ignore_index=300)


def test_ignore_index_that_fits_is_accepted():
    logits = torch.randn(1, 4, 3, 3)
    labels = torch.zeros(1, 3, 3, dtype=torch.uint8)
    loss = inc.cds_dice_loss(logits, labels, num_old=2, ignore_index=255)
    assert torch.isfinite(loss)


def test_check_labels_names_the_offending_values():
    labels = torch.tensor([[0, 3, 255, 7], [-1, 7, 2, 300]], dtype=torch.int64)
    inc.check_labels(torch.tensor([[0, 3, 255]]), num_classes=4)  # in range or ignored: no error
    with pytest.raises(ValueError) as info:
        inc.check_labels(labels, num_classes=4)
    message = str(info.value)
    for fragment in ("(2, 4)", "[0, 4)", "ignore_index=255", "-1 (1×)", "7 (2×)", "300 (1×)", "4 values"):
        assert fragment in message, f"{fragment!r} not in {message}"
    inc.check_labels(labels.clamp(0, 3), num_classes=4)
    with pytest.raises(ValueError, match="-1"):
        inc.check_labels(torch.tensor([0, -1, 300]), num_classes=4, ignore_index=300)
    many = torch.arange(10, 30)
    with pytest.raises(ValueError, match="and 10 more distinct values"):
        inc.check_labels(many, num_classes=5)
    with pytest.raises(TypeError, match="labels"):
        inc.check_labels(torch.zeros(3), num_classes=4)
    with pytest.raises(TypeError, match="num_classes"):
        inc.check_labels(labels, num_classes=4.0)
    with pytest.raises(ValueError, match="ignore_index=-1"):
        inc.check_labels(torch.zeros(3, dtype=torch.uint8), num_classes=4, ignore_index=-1)


def test_negative_bg_weight_is_rejected():
    labels = torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"bg_weight .*-0\.5"):
        inc.fod_token_weights(labels, num_old=2, patch_size=2, bg_weight=-0.5)
