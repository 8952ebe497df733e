"""PLOP's pseudo-labelling on hand-computed examples: histogram-median thresholds, the entropy binning and the
pseudo-label rule with its per-image factor.

Runs through the public API on every device: the plain-PyTorch path on CPU (the Triton kernels under
TRITON_INTERPRET=1, where tests/ops/test_seg_head.py also checks them against the reference on drawn
shapes), the kernels on CUDA.
"""
import math

import pytest
import torch

import incrementer_fast as inc


def test_thresholds_are_histogram_medians():
    histogram = torch.tensor(
        [
            [0, 2, 0, 2],  # half = 2 is reached at the end of bin 1: median = 2/4
            [0, 0, 0, 0],  # class never predicted: 0, then the floor
            [4, 0, 0, 0],  # all in bin 0: half-way through it, 0.5 · 1/4
            [1, 1, 1, 1],  # half = 2 at the end of bin 1 again
            [0, 0, 3, 1],  # half = 2 inside bin 2: 2/4 + (2 − 0)/3 · 1/4
        ]
    )
    thresholds = inc.plop_thresholds(histogram, floor=0.001)
    expected = torch.tensor([0.5, 0.001, 0.125, 0.5, 0.5 + 2 / 3 / 4])
    assert thresholds.dtype == torch.float32
    torch.testing.assert_close(thresholds, expected)
    # The floor applies to every class, not only to the empty ones.
    torch.testing.assert_close(inc.plop_thresholds(histogram, floor=0.3)[2], torch.tensor(0.3))


def test_threshold_of_uniform_entropies_is_their_median():
    """With many values spread uniformly over [0, 0.6), the interpolated median is 0.3 up to a bin's count."""
    values = (torch.arange(6000, dtype=torch.float64) + 0.5) / 10000
    bins = torch.floor(values * 100).long()
    histogram = torch.zeros(2, 100, dtype=torch.int64)
    histogram[0].scatter_add_(0, bins, torch.ones_like(bins))
    assert abs(inc.plop_thresholds(histogram)[0].item() - values.median().item()) < 1e-4


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


def one_pixel_teacher(pixel_logits, device):
    """Teacher masks whose every pixel is given (K, H, W logits at resolution 1:1, so no interpolation)."""
    return torch.tensor(pixel_logits, dtype=torch.float64, device=device)[None]


def test_entropy_binning_by_hand(device):
    # Two classes: logits (0, log 3) give p = (1/4, 3/4), H = −(¼ln¼ + ¾ln¾), e = H / ln 2 ≈ 0.811.
    # Uniform logits give e = 1, which goes to the last bin; a confident pixel gives e ≈ 0 (bin 0).
    teacher = one_pixel_teacher([[[0.0, 0.0, 40.0, 0.0]], [[math.log(3), 0.0, 0.0, 0.0]]], device)
    labels = torch.tensor([[[0, 0, 0, 7]]], device=device)  # the last pixel is not background: not counted
    histogram = inc.entropy_histogram(teacher, labels, num_bins=10)
    expected = torch.zeros(2, 10, dtype=torch.int64)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    expected[1, int(entropy * 10)] = 1  # argmax class 1 (p = 3/4), bin 8
    expected[0, 9] = 1  # tie → argmax 0 (first index), e = 1 → last bin
    expected[0, 0] = 1  # class 0 at logit 40: e ≈ 0
    assert torch.equal(histogram.cpu(), expected)


def test_pseudo_label_rule_by_hand(device):
    # Three old classes. Columns: confident class 2; uniform (e = 1); confident class 1 with a label of a new
    # class (kept); confident class 0; uncertain class 1 (p ≈ (0.2, 0.6, 0.2)); ignored pixel (kept).
    logits = [
        [0.0, 0.0, 0.0, 30.0, 0.0, 0.0],
        [0.0, 0.0, 30.0, 0.0, math.log(3), 0.0],
        [30.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
    teacher = one_pixel_teacher([[row] for row in logits], device)
    labels = torch.tensor([[[0, 0, 5, 0, 0, 255]]], device=device)
    thresholds = torch.tensor([0.5, 0.5, 0.5], device=device)
    pseudo, factor = inc.pseudo_label(teacher, labels, thresholds)
    assert pseudo.dtype == torch.int64
    assert pseudo.cpu().tolist() == [[[2, 255, 5, 0, 255, 255]]]
    # Four label-0 pixels, two of them confident.
    assert factor.cpu().tolist() == [0.5]

    # The uncertain class-1 pixel has e = (−0.4·ln 0.2 − 0.6·ln 0.6)/ln 3 ≈ 0.865: a higher threshold of its
    # predicted class admits it; thresholds of 0 reject every pixel predicted as classes 0 and 2.
    relaxed = torch.tensor([0.0, 0.9, 0.0], device=device)
    pseudo, factor = inc.pseudo_label(teacher, labels, relaxed)
    assert pseudo.cpu().tolist() == [[[255, 255, 5, 255, 1, 255]]]
    assert factor.cpu().tolist() == [0.25]


def test_image_factor_without_background_and_its_floor(device):
    teacher = torch.zeros(2, 3, 2, 2, dtype=torch.float32, device=device)  # uniform: nothing is confident
    labels = torch.tensor([[[4, 4], [255, 4]], [[0, 0], [0, 4]]], device=device)
    pseudo, factor = inc.pseudo_label(teacher, labels, torch.full((3,), 0.5, device=device), min_image_factor=0.1)
    assert factor.dtype == torch.float32
    # Image 0 has no label-0 pixel (factor 1, loss unchanged); image 1 has 3, none confident: 0 → floor 0.1.
    torch.testing.assert_close(factor.cpu(), torch.tensor([1.0, 0.1]))
    assert pseudo[1].cpu().tolist() == [[255, 255], [255, 4]]


def test_thresholds_from_teacher_statistics_end_to_end(device):
    """Histogram over two batches, thresholds, then pseudo-labels: the median splits each class's pixels."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64) * 3, torch.zeros(2, 12, 12, dtype=torch.long))
        for _ in range(2)
    ]
    histogram = sum(inc.entropy_histogram(t.to(device), l.to(device), num_bins=1000) for t, l in batches)
    thresholds = inc.plop_thresholds(histogram)
    assert histogram.sum().item() == 2 * 2 * 144
    confident = sum(
        (inc.pseudo_label(t.to(device), l.to(device), thresholds)[0] != 255).sum().item() for t, l in batches
    )
    # Below each class's median lies about half of its pixels (bins of 1/1000 resolve ties of the median).
    assert abs(confident - 2 * 144) <= 12
