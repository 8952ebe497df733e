"""Evaluation metrics on a hand-computed confusion matrix."""
import math

import pytest
import torch
import torch.distributed as dist

from incrementer_fast.continual.metrics import ConfusionMatrix, summarize

# (target, pred) -> pixel count, 4 classes: 0 background and 1 old; 2 and 3 new, 3 absent everywhere.
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
    s = summarize(cm, old_classes=[0, 1], new_classes=[2, 3])
    assert s["miou_old"] == pytest.approx(0.5)
    assert s["miou_new"] == pytest.approx(0.6)  # class 3 absent from GT and predictions: excluded
    assert s["miou_all"] == pytest.approx((0.5 + 0.5 + 0.6) / 3)
    assert s["per_class_iou"][:3] == pytest.approx([0.5, 0.5, 0.6]) and s["per_class_iou"][3] is None
    assert s["new_fp_rate"] == pytest.approx(3 / 13)
    assert s["new_fdr"] == pytest.approx(1 / 3)
    assert s["pixel_acc"] == pytest.approx(14 / 20)
    assert summarize(cm.mat, [0, 1], [2, 3]) == s  # a bare tensor works too


def test_summary_at_step_zero():
    pred, target = _pixels()
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    s = summarize(cm, old_classes=[], new_classes=[0, 1, 2])
    assert s["miou_old"] is None and s["new_fp_rate"] is None
    assert s["miou_new"] == pytest.approx((0.5 + 0.5 + 0.6) / 3) == s["miou_all"]
    assert len(s["per_class_iou"]) == 3


def test_class_predicted_but_absent_from_ground_truth_scores_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2, 2]), torch.tensor([0, 0, 1]))
    assert cm.iou().tolist() == pytest.approx([0.5, 0.0, 0.0])


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
        summarize(cm, [0, 1], [1, 2])
    with pytest.raises(ValueError, match="out of range"):
        summarize(cm, [0], [5])


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
