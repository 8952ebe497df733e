"""Segmenter's sliding-window evaluation (``--eval-mode slide``) against an independent transcription.

Transcribed from rstrudel/segmenter (MIT licence, Copyright (c) 2021 Robin Strudel): ``segm/model/utils.py``
``resize``, ``sliding_window``, ``merge_windows``, ``inference`` (one scale, no flip), and the keep-ratio
rescale of its ADE20K validation pipeline (``segm/data/config/ade20k.py``: mmseg ``Resize`` to
``img_scale=(512 * 4, 512)``, mmcv's rounding ``int(side * scale + 0.5)``), here applied to the
normalised float image as ours does.
"""
import pytest
import torch
import torch.nn.functional as F

import incrementer_fast as inc
from incrementer_fast.continual.inference import segmenter_input_size, sliding_window_logits, window_anchors


def mmseg_keep_ratio_resize(im, window, max_ratio=4):
    h, w = im.shape[2:]
    scale = min(max_ratio * window / max(h, w), window / min(h, w))
    return F.interpolate(im, (int(h * scale + 0.5), int(w * scale + 0.5)), mode="bilinear")


def segmenter_resize(im, smaller_size):
    h, w = im.shape[2:]
    if h < w:
        ratio = w / h
        h_res, w_res = smaller_size, ratio * smaller_size
    else:
        ratio = h / w
        h_res, w_res = ratio * smaller_size, smaller_size
    if min(h, w) < smaller_size:
        im_res = F.interpolate(im, (int(h_res), int(w_res)), mode="bilinear")
    else:
        im_res = im
    return im_res


def segmenter_sliding_window(im, window_size, window_stride):
    B, C, H, W = im.shape
    ws = window_size
    windows = {"crop": [], "anchors": []}
    h_anchors = torch.arange(0, H, window_stride)
    w_anchors = torch.arange(0, W, window_stride)
    h_anchors = [h.item() for h in h_anchors if h < H - ws] + [H - ws]
    w_anchors = [w.item() for w in w_anchors if w < W - ws] + [W - ws]
    for ha in h_anchors:
        for wa in w_anchors:
            windows["crop"].append(im[:, :, ha:ha + ws, wa:wa + ws])
            windows["anchors"].append((ha, wa))
    windows["shape"] = (H, W)
    return windows


def segmenter_merge_windows(windows, window_size, ori_shape):
    ws = window_size
    im_windows = windows["seg_maps"]
    C = im_windows[0].shape[0]
    H, W = windows["shape"]
    logit = torch.zeros((C, H, W), dtype=im_windows.dtype)
    count = torch.zeros((1, H, W), dtype=im_windows.dtype)
    for window, (ha, wa) in zip(im_windows, windows["anchors"]):
        logit[:, ha:ha + ws, wa:wa + ws] += window
        count[:, ha:ha + ws, wa:wa + ws] += 1
    logit = logit / count
    logit = F.interpolate(logit.unsqueeze(0), ori_shape, mode="bilinear")[0]
    return F.softmax(logit, 0)


def segmenter_inference(model, im, window_size, window_stride):
    ori_shape = im.shape[2:]
    im = segmenter_resize(mmseg_keep_ratio_resize(im, window_size), window_size)
    windows = segmenter_sliding_window(im, window_size, window_stride)
    crops = torch.stack(windows.pop("crop"))[:, 0]
    windows["seg_maps"] = model.logits(crops)
    return segmenter_merge_windows(windows, window_size, ori_shape)


@pytest.mark.parametrize("height,width,window,stride", [(40, 70, 24, 16), (90, 20, 16, 16), (24, 24, 24, 8)])
def test_sliding_window_is_segmenters(height, width, window, stride):
    torch.manual_seed(0)
    model = inc.Incrementer("test_vit", 4, d_model=64, attention="sdpa").double().eval()
    image = torch.randn(1, 3, height, width, dtype=torch.float64)
    with torch.no_grad():
        ours = sliding_window_logits(model, image, window, stride, batch_size=3)
        theirs = segmenter_inference(model, image, window, stride)
    assert ours.shape == (1, 4, height, width)
    assert torch.allclose(ours[0].softmax(0), theirs, rtol=0, atol=1e-12)


def test_window_geometry():
    assert window_anchors(512, 512, 512) == [0]
    assert window_anchors(683, 512, 512) == [0, 171]  # ADE20K: one window, then one flush with the border
    assert window_anchors(700, 480, 320) == [0, 220]  # Pascal Context's 480 / 320
    assert segmenter_input_size(375, 500, 512) == (512, 683)  # short side to the window
    # 100 × 1000 at window 64: the long side capped at 4·64 gives 26 × 256, then the short side is enlarged
    # to 64 and the long one truncated: int(256 / 26 · 64) = 630.
    assert segmenter_input_size(100, 1000, 64) == (64, 630)
    with pytest.raises(ValueError, match="positive ints"):
        sliding_window_logits(None, torch.zeros(1, 3, 8, 8), 0, 4)
