"""Evaluation metrics on a hand-computed confusion matrix."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from incrementer_fast.continual.metrics import ConfusionMatrix, mean_iou, summarize

# (target, pred) -> pixel count, 4 classes: 0 background and 1 at step 0; 2 and 3 at step 1, 3 absent everywhere.
PAIRS = {(0, 0): 5, (0, 1): 1, (0, 2): 2, (1, 0): 1, (1, 1): 3, (1, 2): 1, (2, 0): 1, (2, 2): 6}
# Hand-computed:
#   rows (ground truth)  [5 1 2 0] [1 3 1 0] [1 0 6 0] [0 0 0 0]; column sums 7 4 9 0
#   IoU0 = 5 / (8 + 7 - 5) = 0.5;  IoU1 = 3 / (5 + 4 - 3) = 0.5;  IoU2 = 6 / (7 + 9 - 6) = 0.6;  IoU3 = 0/0
#   new_fp_rate = old-class pixels predicted new / old-class pixels = (2 + 1) / (8 + 5) = 3/13
#   new_fdr = 1 - correct new / predicted new = 1 - 6/9 = 1/3;  pixel_acc = 14 / 20
EXPECTED_MAT = [[5, 1, 2, 0], [1, 3, 1, 0], [1, 0, 6, 0], [0, 0, 0, 0]]


def _pixels():
    target, pred = [], []
    for (t, p), n in PAIRS.items():
        target += [t] * n
        pred += [p] * n
    target += [255] * 3  # ignored, whatever the prediction
    pred += [3] * 3
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(target), generator=g)
    return torch.tensor(pred)[order], torch.tensor(target)[order]


def test_confusion_matrix_counts():
    pred, target = _pixels()
    cm = ConfusionMatrix(4)
    cm.update(pred.view(1, 23), target.view(1, 23))
    assert cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == EXPECTED_MAT
    split = ConfusionMatrix(4)  # batch by batch gives the same counts
    split.update(pred[:10], target[:10])
    split.update(pred[10:], target[10:])
    assert torch.equal(split.mat, cm.mat)


def test_iou_and_summary():
    pred, target = _pixels()
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    iou = cm.iou()
    assert iou.dtype == torch.float64
    assert iou[:3].tolist() == pytest.approx([0.5, 0.5, 0.6])
    assert math.isnan(iou[3])
    s = summarize(cm, [[0, 1], [2, 3]], 1)
    assert s["miou_old"] == pytest.approx(0.5)
    assert s["miou_new"] == pytest.approx(0.6)  # class 3 has no ground truth: excluded
    assert s["miou_all"] == pytest.approx((0.5 + 0.5 + 0.6) / 3)
    assert s["per_class_iou"][:3] == pytest.approx([0.5, 0.5, 0.6]) and s["per_class_iou"][3] is None
    assert s["new_fp_rate"] == pytest.approx(3 / 13)
    assert s["new_fdr"] == pytest.approx(1 / 3)
    assert s["pixel_acc"] == pytest.approx(14 / 20)
    assert summarize(cm.mat, [[0, 1], [2, 3]], 1) == s  # a bare tensor works too


# Three steps, task [[0, 1], [2], [3, 4]]; class 4 is predicted once but has no ground-truth pixel.
#   rows (ground truth)  [5 1 0 2 0] [1 3 1 0 1] [1 0 6 0 0] [2 0 0 2 0] [0 0 0 0 0]
#   row sums 8 6 7 4 0, column sums 9 4 7 4 1, 25 pixels
#   IoU0 = 5/(8+9-5) = 5/12, IoU1 = 3/(6+4-3) = 3/7, IoU2 = 6/(7+7-6) = 3/4, IoU3 = 2/(4+4-2) = 1/3,
#   IoU4: no ground truth → left out of every mean (MiB/PLOP's "X"; it would be 0/1 = 0 if scored)
THREE_STEPS = [[0, 1], [2], [3, 4]]
MAT5 = torch.tensor([[5, 1, 0, 2, 0], [1, 3, 1, 0, 1], [1, 0, 6, 0, 0], [2, 0, 0, 2, 0], [0, 0, 0, 0, 0]])
IOU5 = [5 / 12, 3 / 7, 3 / 4, 1 / 3]


def test_old_new_split_is_the_papers_at_every_step():
    """old = step-0 classes, new = every class added after step 0 so far, all = both; the split of the
    step itself is miou_prev / miou_step. Hand-computed on MAT5."""
    last = summarize(MAT5, THREE_STEPS, 2)
    assert last["per_class_iou"][:4] == pytest.approx(IOU5) and last["per_class_iou"][4] is None
    assert last["miou_old"] == pytest.approx((5 / 12 + 3 / 7) / 2)
    assert last["miou_new"] == pytest.approx((3 / 4 + 1 / 3) / 2)  # classes 2, 3 (4 left out)
    assert last["miou_all"] == pytest.approx(sum(IOU5) / 4)
    assert last["miou_prev"] == pytest.approx((5 / 12 + 3 / 7 + 3 / 4) / 3)
    assert last["miou_step"] == pytest.approx(1 / 3)
    assert last["chance_miou_new"] == pytest.approx((7 / 25 + 4 / 25) / 2)  # shares of classes 2 and 3
    assert last["new_fp_rate"] == pytest.approx(3 / 21)  # rows 0-2 predicted as 3 or 4: 2 + 1 of 21
    assert last["new_fdr"] == pytest.approx(1 - 2 / 5)  # columns 3, 4: 5 predicted, 2 right
    assert last["pixel_acc"] == pytest.approx(16 / 25)

    middle = summarize(MAT5, THREE_STEPS, 1)  # same old set at every step; new grows
    assert middle["miou_old"] == last["miou_old"]
    assert middle["miou_new"] == pytest.approx(3 / 4) == middle["miou_step"]
    assert middle["miou_prev"] == middle["miou_old"]

    first = summarize(MAT5, THREE_STEPS, 0)
    assert first["miou_old"] == pytest.approx((5 / 12 + 3 / 7) / 2) == first["miou_all"] == first["miou_step"]
    for key in ("miou_new", "miou_prev", "chance_miou_new", "new_fp_rate", "new_fdr"):
        assert first[key] is None, key
    assert len(first["per_class_iou"]) == 2


def test_mean_iou_matches_mibs_stream_metrics():
    """An independent transcription of MiB's ``StreamSegMetrics.get_results`` mean IoU (fcdl94/MiB,
    metrics/stream_metrics.py, MIT licence, Copyright (c) 2020 Fabio Cermelli): IoU with EPS 1e-6 in the
    denominator, averaged over the classes whose ground-truth row is not empty."""
    hist = MAT5.double().numpy()
    gt_sum = hist.sum(axis=1)
    mask = gt_sum != 0
    diag = np.diag(hist)
    iu = diag / (gt_sum + hist.sum(axis=0) - diag + 1e-6)
    assert summarize(MAT5, THREE_STEPS, 2)["miou_all"] == pytest.approx(float(np.mean(iu[mask])), abs=1e-6)
    assert mean_iou([None, 0.5, float("nan"), 0.25], range(4)) == pytest.approx(0.375)
    assert mean_iou([None, 0.5], [0]) is None


def test_class_predicted_but_absent_from_ground_truth_is_left_out():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2, 2]), torch.tensor([0, 0, 1]))
    iou = cm.iou().tolist()
    assert iou[:2] == pytest.approx([0.5, 0.0]) and math.isnan(iou[2])  # 1: in GT, never right → 0
    assert summarize(cm, [[0, 1], [2]], 1)["miou_all"] == pytest.approx(0.25)


def test_update_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="values must lie in 0..2"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="values must lie in 0..2"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    assert cm.mat.sum() == 0  # nothing was counted by the rejected calls
    cm.update(torch.tensor([1, 2]), torch.tensor([255, 255]))  # all ignored: a no-op
    assert cm.mat.sum() == 0
    with pytest.raises(ValueError, match="overlap"):
        summarize(cm, [[0, 1], [1, 2]], 1)
    with pytest.raises(ValueError, match="out of range"):
        summarize(cm, [[0], [5]], 1)
    with pytest.raises(ValueError, match="out of range"):
        summarize(cm, [[0, 1], [2]], 2)


def test_all_reduce_without_process_group_is_identity():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert cm.all_reduce().mat.tolist() == [[1, 1], [0, 0]]


def test_all_reduce_in_a_process_group(tmp_path):
    """all_reduce under an initialised gloo group (one process here, so the sum is the matrix itself; the
    trainer's two-process DDP test checks the sum across ranks, too slow to repeat here)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        pred, target = _pixels()
        cm = ConfusionMatrix(4)
        cm.update(pred, target)
        assert cm.all_reduce().mat.tolist() == EXPECTED_MAT
    finally:
        dist.destroy_process_group()
