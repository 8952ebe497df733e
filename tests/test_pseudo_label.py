"""PLOP's pseudo-labelling: bit-identical to an independent transcription of PLOP's released code, plus
hand-computed examples of the histogram median, the entropy binning and the pseudo-label rule.

The hand-computed examples run through the public API on every device: the plain-PyTorch path on CPU (the
Triton kernels under TRITON_INTERPRET=1, where tests/ops/test_seg_head.py also checks them against the
reference on drawn shapes), the kernels on CUDA. The transcription tests compare the reference (the spec)
with PLOP's code on the CPU: the kernels compute the same formulas in another order, so they can differ
from it in the last float bit (tests/ops checks that they flip a pixel only at its threshold).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import incrementer_fast as inc
from incrementer_fast import reference

IGNORE = 255


# ------------------------------------------------------------------------ transcription of PLOP's code
# Transcribed from arthurdouillard/CVPR2021_PLOP, train.py (commit 4b4a060; MIT License, Copyright (c) 2021
# Arthur Douillard): the function `entropy`, the `entropy` branch of `Trainer.find_median` (the histogram and
# the median loop) and of `Trainer.train` (pseudo-labels and `classif_adaptive_factor`), with the default
# options of its PLOP scripts (--pseudo entropy --threshold 0.001 --classif_adaptive_factor, 100 bins).
# Trainer state is passed as arguments; nothing else is changed.
def plop_entropy(probabilities):
    factor = 1 / math.log(probabilities.shape[1] + 1e-8)
    return -factor * torch.mean(probabilities * torch.log(probabilities + 1e-8), dim=1)


def plop_find_median(batches, nb_current_classes, threshold=0.001, nb_bins=100):
    """`batches`: (outputs_old (B, K_old, H, W) full-resolution logits, labels (B, H, W)) pairs."""
    max_value = torch.log(torch.tensor(nb_current_classes).float())
    histograms = torch.zeros(nb_current_classes, nb_bins).long()
    for outputs_old, labels in batches:
        mask_bg = labels == 0
        probas = torch.softmax(outputs_old, dim=1)
        max_probas, pseudo_labels = probas.max(dim=1)
        values_to_bins = plop_entropy(probas)[mask_bg].view(-1) / max_value
        x_coords = pseudo_labels[mask_bg].view(-1)
        y_coords = torch.clamp((values_to_bins * nb_bins).long(), max=nb_bins - 1)
        histograms.index_put_((x_coords, y_coords), torch.LongTensor([1]).expand_as(x_coords), accumulate=True)
    return plop_median_of_histograms(histograms, threshold, nb_bins), max_value, histograms


def plop_median_of_histograms(histograms, threshold=0.001, nb_bins=100):
    thresholds = torch.zeros(histograms.shape[0], dtype=torch.float32)
    for c in range(histograms.shape[0]):
        total = histograms[c].sum()
        if total <= 0.:
            continue
        half = total / 2
        running_sum = 0.
        for lower_border in range(nb_bins):
            lower_border = lower_border / nb_bins
            bin_index = int(lower_border * nb_bins)
            if half >= running_sum and half <= (running_sum + histograms[c, bin_index]):
                break
            running_sum += lower_border * nb_bins
        median = lower_border + ((half - running_sum) / histograms[c, bin_index].sum()) * (1 / nb_bins)
        thresholds[c] = median
    for c in range(len(thresholds)):
        thresholds[c] = max(thresholds[c], threshold)
    return thresholds


def plop_pseudo_labels(outputs_old, labels, old_classes, thresholds, max_entropy):
    labels = labels.clone()
    mask_background = labels < old_classes
    probs = torch.softmax(outputs_old, dim=1)
    max_probs, pseudo_labels = probs.max(dim=1)
    mask_valid_pseudo = (plop_entropy(probs) / max_entropy) < thresholds[pseudo_labels]
    labels[~mask_valid_pseudo & mask_background] = 255
    labels[mask_valid_pseudo & mask_background] = pseudo_labels[mask_valid_pseudo & mask_background]
    num = (mask_valid_pseudo & mask_background).float().sum(dim=(1, 2))
    den = mask_background.float().sum(dim=(1, 2))
    classif_adaptive_factor = num / (den + 1e-6)
    return labels, classif_adaptive_factor


# ------------------------------------------------------------------------ ours against the transcription
def training_batches(num_old, num_new, generator, num_batches=2, batch=2, patches=8, size=64):
    """Teacher masks at patch resolution and step-t training labels (background 0, new classes, void 255)."""
    batches = []
    for _ in range(num_batches):
        # Logits of a trained teacher: a few confident pixels, most of them spread (the usual case).
        masks = torch.randn(batch, num_old, patches, patches, generator=generator) * 4.0
        labels = torch.zeros(batch, size, size, dtype=torch.long)
        new_class = torch.randint(num_old, num_old + num_new, (batch, 1, 1), generator=generator)
        labels = torch.where(torch.rand(batch, size, size, generator=generator) < 0.3, new_class, labels)
        labels[torch.rand(batch, size, size, generator=generator) < 0.05] = IGNORE
        labels[0, :, : size // 4] = new_class[0]  # one image with a block of new class and no void in it
        batches.append((masks, labels))
    return batches


@pytest.mark.parametrize("num_old, num_classes", [(16, 17), (101, 151)], ids=["voc-15-1", "ade-100-50"])
def test_pseudo_labels_are_bit_identical_to_plops_code(num_old, num_classes):
    """VOC 15-1 (K_old = 16, K_total = 17) and ADE 100-50 (101, 151): histogram, thresholds, pseudo-label maps
    and image factors of the reference equal PLOP's, bit for bit. Our masks are patch-resolution; PLOP's
    model upsamples its decoder output the same way (bilinear, align_corners=False) before using it."""
    generator = torch.Generator().manual_seed(num_old)
    batches = training_batches(num_old, num_classes - num_old, generator)
    upsampled = [(F.interpolate(m, l.shape[-2:], mode="bilinear", align_corners=False), l) for m, l in batches]
    plop_thresholds, max_entropy, plop_histogram = plop_find_median(upsampled, num_classes)

    histogram = sum(reference.entropy_histogram(m, l, num_classes=num_classes) for m, l in batches)
    assert torch.equal(histogram, plop_histogram[:num_old]) and plop_histogram[num_old:].sum() == 0
    thresholds = reference.plop_thresholds(histogram)
    torch.testing.assert_close(thresholds, plop_thresholds[:num_old], rtol=0, atol=0, equal_nan=True)
    confident = 0
    for (masks, labels), (logits, _) in zip(batches, upsampled):
        expected, expected_factor = plop_pseudo_labels(logits, labels, num_old, plop_thresholds, max_entropy)
        pseudo, factor = reference.pseudo_label(masks, labels, thresholds, num_classes=num_classes)
        assert torch.equal(pseudo, expected)
        assert torch.equal(factor, expected_factor)
        confident += int(((labels == 0) & (pseudo != IGNORE)).sum())
    assert confident > 0  # the comparison covers pseudo-labelled pixels, not only ignored ones


def test_plop_median_is_bit_identical_on_awkward_histograms():
    """PLOP's median search on histograms that hit its quirks: counts beyond 2^24 (float32 rounding of half),
    the bins 28/29 and 56–58 that int(i/100·100) revisits, a search that finds no bin, empty classes."""
    generator = torch.Generator().manual_seed(3)
    rows = [
        torch.randint(0, 40, (100,), generator=generator),  # spread: the search stops inside
        torch.randint(0, 3, (100,), generator=generator) * 10**6,  # huge totals, float32 half
        torch.zeros(100, dtype=torch.long),  # never predicted
    ]
    for hot in (28, 29, 56, 57, 58, 99):
        row = torch.zeros(100, dtype=torch.long)
        row[hot] = 1000 + hot
        row[hot - 1] = 3
        rows.append(row)
    for total in (1, 2, 5, 17, 2**24 + 1, 3 * 10**7 + 7):
        row = torch.zeros(100, dtype=torch.long)
        row[0] = total // 3
        row[1] = total - total // 3
        rows.append(row)
    histogram = torch.stack(rows)
    ours = reference.plop_thresholds(histogram, floor=0.001)
    torch.testing.assert_close(ours, plop_median_of_histograms(histogram, 0.001), rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------ hand-computed examples
def test_plop_median_quirks_by_hand():
    """PLOP's loop adds the bin *index* to its running sum S (S_i = 0 + 1 + … + (i − 1)) and stops at the first
    bin with S_i ≤ half ≤ S_i + n_i; median = i/100 + (half − S_i)/n_i · 1/100."""
    histogram = torch.zeros(4, 100, dtype=torch.long)
    histogram[0, 0] = 10  # half = 5 ≤ 0 + 10: bin 0, median 0.5/100
    histogram[1, 2] = 5  # half = 2.5 > S_0 + n_0 = 0, > S_1 + n_1 = 0; S_2 = 1: bin 2, (2 + 1.5/5)/100
    histogram[2, 5] = 2  # half = 1 = S_2 with n_2 = 0: the search stops at an empty bin → 0/0 = NaN
    histogram[3, 3] = 100  # half = 50: S_3 + n_3 = 103 ≥ 50 ≥ S_3 = 3: bin 3, (3 + 47/100)/100
    thresholds = inc.plop_thresholds(histogram, floor=0.001)
    assert thresholds.dtype == torch.float32
    torch.testing.assert_close(thresholds[[0, 1, 3]], torch.tensor([0.005, 0.023, 0.0347]))
    assert math.isnan(float(thresholds[2]))  # and stays NaN through max(·, floor), as Python's max in PLOP


def test_interpolated_median_by_hand():
    histogram = torch.tensor(
        [
            [0, 2, 0, 2],  # half = 2 is reached at the end of bin 1: median = 2/4
            [0, 0, 0, 0],  # class never predicted: 0, then the floor
            [4, 0, 0, 0],  # all in bin 0: half-way through it, 0.5 · 1/4
            [1, 1, 1, 1],  # half = 2 at the end of bin 1 again
            [0, 0, 3, 1],  # half = 2 inside bin 2: 2/4 + (2 − 0)/3 · 1/4
        ]
    )
    thresholds = inc.plop_thresholds(histogram, floor=0.001, median="interpolated")
    expected = torch.tensor([0.5, 0.001, 0.125, 0.5, 0.5 + 2 / 3 / 4])
    assert thresholds.dtype == torch.float32
    torch.testing.assert_close(thresholds, expected)
    # The floor applies to every class, not only to the empty ones.
    torch.testing.assert_close(inc.plop_thresholds(histogram, floor=0.3, median="interpolated")[2], torch.tensor(0.3))


def one_pixel_teacher(pixel_logits, device):
    """Teacher masks whose every pixel is given (K, H, W logits at resolution 1:1, so no interpolation)."""
    return torch.tensor(pixel_logits, dtype=torch.float64, device=device)[None]


def test_entropy_binning_by_hand(device):
    # Two classes: logits (0, log 3) give p = (1/4, 3/4), H = −(¼ln¼ + ¾ln¾), normalised e = H / ln 2 ≈ 0.811;
    # PLOP's e = H / (2 · ln(2 + 1e-8) · ln 3) up to its 1e-8 inside the log ≈ 0.369.
    # Uniform logits give normalised e = 1 (last bin), PLOP's 1 / (2 ln 3) ≈ 0.455; a confident pixel ≈ 0.
    teacher = one_pixel_teacher([[[0.0, 0.0, 40.0, 0.0]], [[math.log(3), 0.0, 0.0, 0.0]]], device)
    labels = torch.tensor([[[0, 0, 0, 7]]], device=device)  # the last pixel is not background: not counted
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    for kind, scale in (("normalized", 1 / math.log(2)), ("plop", 1 / (2 * math.log(2) * math.log(3)))):
        histogram = inc.entropy_histogram(teacher, labels, num_bins=10, num_classes=3, entropy=kind)
        expected = torch.zeros(2, 10, dtype=torch.int64)
        expected[1, int(entropy * scale * 10)] = 1  # argmax class 1 (p = 3/4): bin 8, PLOP's bin 3
        expected[0, min(int(math.log(2) * scale * 10), 9)] = 1  # tie → class 0 (first index): bin 9, PLOP's 4
        expected[0, 0] = 1  # class 0 at logit 40: e ≈ 0
        assert torch.equal(histogram.cpu(), expected), kind


@pytest.mark.parametrize("kind", ["normalized", "plop"])
def test_pseudo_label_rule_by_hand(device, kind):
    # Three old classes. Columns: confident class 2; uniform; confident class 1 with a label of a new class
    # (kept); confident class 0; uncertain class 1 (p ≈ (0.2, 0.6, 0.2)); ignored pixel (kept).
    logits = [
        [0.0, 0.0, 0.0, 30.0, 0.0, 0.0],
        [0.0, 0.0, 30.0, 0.0, math.log(3), 0.0],
        [30.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
    teacher = one_pixel_teacher([[row] for row in logits], device)
    labels = torch.tensor([[[0, 0, 5, 0, 0, 255]]], device=device)
    # The uncertain pixel's entropy: (−0.4·ln 0.2 − 0.6·ln 0.6)/ln 3 ≈ 0.865 normalised; PLOP's divides that
    # by 3·ln 6 more: ≈ 0.161. Uniform: 1 and 1/(3 ln 6) ≈ 0.186.
    unit = 1.0 if kind == "normalized" else 1 / (3 * math.log(6))
    options = dict(num_classes=6, entropy=kind)
    pseudo, factor = inc.pseudo_label(teacher, labels, torch.full((3,), 0.5 * unit, device=device), **options)
    assert pseudo.dtype == torch.int64
    assert pseudo.cpu().tolist() == [[[2, 255, 5, 0, 255, 255]]]
    # Four label-0 pixels, two of them confident: PLOP's 2 / (4 + 1e-6).
    assert factor.cpu().tolist() == [2 / (4 + 1e-6)]

    # A higher threshold of its predicted class admits the uncertain pixel; negative thresholds reject every
    # pixel predicted as classes 0 and 2 (not 0: in float64 PLOP's log(1 + 1e-8) > 0 makes a certain pixel's
    # entropy slightly negative).
    relaxed = torch.tensor([-1.0, 0.9 * unit, -1.0], device=device)
    pseudo, factor = inc.pseudo_label(teacher, labels, relaxed, **options)
    assert pseudo.cpu().tolist() == [[[255, 255, 5, 255, 1, 255]]]
    assert factor.cpu().tolist() == [1 / (4 + 1e-6)]


def test_image_factor_without_background_and_its_floor(device):
    teacher = torch.zeros(3, 3, 2, 2, dtype=torch.float32, device=device)  # uniform: nothing is confident
    labels = torch.tensor([[[4, 4], [255, 4]], [[0, 0], [0, 4]], [[4, 4], [4, 4]]], device=device)
    thresholds = torch.full((3,), 0.5, device=device)
    pseudo, factor = inc.pseudo_label(teacher, labels, thresholds, num_classes=5, entropy="normalized")
    # As PLOP (0 / (0 + 1e-6)): an image without label-0 pixels gets 0 — its whole CE vanishes.
    assert factor.dtype == torch.float32 and factor.cpu().tolist() == [0.0, 0.0, 0.0]
    assert pseudo[1].cpu().tolist() == [[255, 255], [255, 4]]
    _, factor = inc.pseudo_label(teacher, labels, thresholds, 255, 0.1, num_classes=5, entropy="normalized")
    torch.testing.assert_close(factor.cpu(), torch.tensor([0.1, 0.1, 0.1]))


def test_thresholds_from_teacher_statistics_end_to_end(device):
    """Histogram over two batches, thresholds, then pseudo-labels: the interpolated median of the normalised
    entropy splits each class's pixels in half."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64) * 3, torch.zeros(2, 12, 12, dtype=torch.long))
        for _ in range(2)
    ]
    options = dict(num_classes=5, entropy="normalized")
    histogram = sum(inc.entropy_histogram(t.to(device), l.to(device), num_bins=1000, **options) for t, l in batches)
    thresholds = inc.plop_thresholds(histogram, median="interpolated")
    assert histogram.sum().item() == 2 * 2 * 144
    confident = sum(
        (inc.pseudo_label(t.to(device), l.to(device), thresholds, **options)[0] != 255).sum().item()
        for t, l in batches
    )
    # Below each class's median lies about half of its pixels (bins of 1/1000 resolve ties of the median).
    assert abs(confident - 2 * 144) <= 12
