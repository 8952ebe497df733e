"""Tests of `incrementer_fast.fod_token_weights`: per-patch FOD weights from image-resolution labels."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import incrementer_fast as inc

IGNORE = 255


def test_hand_computed_example():
    # Old classes 1, 2 (num_old = 3), new classes ≥ 3, background 0, ignore 255; 2×2 patches of a 4×6 image:
    labels = torch.tensor(
        [
            [
                [1, 1, 0, 255, 0, 0],
                [1, 1, 1, 2, 0, 0],
                [3, 1, 0, 0, 2, 4],
                [1, 1, 255, 0, 2, 2],
            ]
        ]
    )
    weights = inc.fod_token_weights(labels, num_old=3, patch_size=2, bg_weight=0.5)
    expected = torch.tensor(
        [
            [
                1.0,  # all old
                (0.5 + 0.5 + 1 + 1) / 4,  # background, ignore, two old pixels
                0.5,  # all background
                0.0,  # one new pixel (3)
                (0.5 + 0.5 + 0.5 + 0.5) / 4,  # background and ignore only
                0.0,  # one new pixel (4) among old ones
            ]
        ]
    )
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-7)


def test_patches_are_in_row_major_order_per_image():
    # Image 0: only its bottom-left patch is old; image 1: only its top-right patch holds a new pixel.
    labels = torch.zeros(2, 4, 4, dtype=torch.int64)
    labels[0, 2:, :2] = 1
    labels[1, 0, 3] = 5
    weights = inc.fod_token_weights(labels, num_old=2, patch_size=2, bg_weight=0.25)
    expected = torch.tensor([[0.25, 0.25, 1.0, 0.25], [0.25, 0.0, 0.25, 0.25]])
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)


def test_custom_ignore_index():
    # With ignore_index = 9: 9 counts as background and 255 is an ordinary (new) class.
    labels = torch.tensor([[[9, 9, 255, 1], [1, 1, 1, 1]]], dtype=torch.uint8)
    weights = inc.fod_token_weights(labels, num_old=2, patch_size=2, bg_weight=0.0, ignore_index=9)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.0]]), rtol=0, atol=0)
    default = inc.fod_token_weights(labels.long(), num_old=2, patch_size=2, bg_weight=0.0)
    # default ignore_index 255: 9 is a new class, 255 counts as background
    torch.testing.assert_close(default, torch.tensor([[0.0, 0.75]]), rtol=0, atol=0)


@given(
    batch=st.sampled_from([1, 2, 3]),
    patches_h=st.sampled_from([1, 2, 5]),
    patches_w=st.sampled_from([1, 3, 7]),
    patch_size=st.sampled_from([1, 2, 4]),
    num_old=st.integers(1, 6),
    bg_weight=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_per_patch_loop(batch, patches_h, patches_w, patch_size, num_old, bg_weight, seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = patches_h * patch_size, patches_w * patch_size
    labels = torch.randint(0, 8, (batch, h, w), generator=gen)
    labels[torch.rand(batch, h, w, generator=gen) < 0.2] = IGNORE
    # Keep some images free of new pixels, so that non-zero weights are common.
    labels[torch.rand(batch, generator=gen) < 0.5] %= num_old
    weights = inc.fod_token_weights(labels, num_old, patch_size, bg_weight)
    assert weights.shape == (batch, patches_h * patches_w)
    for b in range(batch):
        for i in range(patches_h):
            for j in range(patches_w):
                patch = labels[b, i * patch_size : (i + 1) * patch_size, j * patch_size : (j + 1) * patch_size]
                pixels = patch.flatten().tolist()
                if any(num_old <= p != IGNORE for p in pixels):
                    expected = 0.0
                else:
                    expected = sum(1.0 if 1 <= p < num_old else bg_weight for p in pixels) / len(pixels)
                assert weights[b, i * patches_w + j].item() == pytest.approx(expected, abs=1e-6)


def test_non_contiguous_labels():
    labels = torch.randint(0, 4, (2, 8, 6)).transpose(1, 2)  # (2, 6, 8)
    weights = inc.fod_token_weights(labels, 2, 2, 0.5)
    torch.testing.assert_close(weights, inc.fod_token_weights(labels.contiguous(), 2, 2, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize(
    "labels, kwargs, error, named",
    [
        (torch.zeros(1, 6, 8, dtype=torch.int64), {"patch_size": 4}, ValueError, "patch_size"),  # H = 6
        (torch.zeros(1, 8, 6, dtype=torch.int64), {"patch_size": 4}, ValueError, "patch_size"),  # W = 6
        (torch.zeros(1, 8, 8), {}, TypeError, "labels"),  # float labels
        (torch.zeros(1, 8, 8, dtype=torch.bool), {}, TypeError, "labels"),
        (torch.zeros(8, 8, dtype=torch.int64), {}, ValueError, "labels"),  # no batch dim
        (torch.zeros(1, 8, 8, dtype=torch.int64), {"patch_size": 0}, ValueError, "patch_size"),
        (torch.zeros(1, 8, 8, dtype=torch.int64), {"num_old": 0}, ValueError, "num_old"),
        (torch.zeros(1, 8, 8, dtype=torch.int64), {"bg_weight": "0.5"}, TypeError, "bg_weight"),
        (torch.zeros(1, 8, 8, dtype=torch.int64), {"ignore_index": 2.5}, TypeError, "ignore_index"),
    ],
)
def test_bad_inputs(labels, kwargs, error, named):
    args = {"num_old": 2, "patch_size": 4, "bg_weight": 0.5, **kwargs}
    with pytest.raises(error, match=named):
        inc.fod_token_weights(labels, **args)
