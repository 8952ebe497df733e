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
