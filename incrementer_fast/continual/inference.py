"""Segmenter's sliding-window evaluation (``--eval-mode slide``).

The default evaluation (``resize``) scores MiB/PLOP's way: each image resized (short side) and centre-cropped
to ``val_size`` and predicted in one forward pass (see transforms.py). ``slide`` scores Segmenter's way
(rstrudel/segmenter ``segm/engine.py: evaluate``, ``segm/model/utils.py: inference, resize,
sliding_window, merge_windows``; its ADE20K validation pipeline ``segm/data/config/ade20k.py``), at the
label's full resolution:

1. the image is resized keeping its aspect ratio to fit ``(4 · window, window)`` (long side ≤ 4 · window,
   short side ≤ window, one of them reached: mmseg's ``Resize(img_scale=(512 * max_ratio, 512),
   keep_ratio=True)`` with ``max_ratio = 4``; sides rounded to the nearest pixel), bilinearly;
2. if its short side is still below ``window`` it is enlarged so that it is ``window`` (``utils.resize``;
   sides truncated);
3. square windows of side ``window`` start every ``stride`` pixels along each axis, at the offsets below
   ``side - window``, plus one flush with the far border at ``side - window`` (``sliding_window``);
4. the model's full-resolution logits of every window are summed where windows overlap and divided by the
   number of windows covering each pixel (``merge_windows``);
5. the merged logits are resized bilinearly to the original image size, where the argmax is scored
   against the original label.

Segmenter's defaults: ADE20K window 512, stride 512; Pascal Context window 480, stride 320
(``segm/config.yml``). The training config's ``window_size`` / ``window_stride`` default to the crop size
and the window. Departures, both without effect on the argmax up to float rounding: Segmenter resizes the
uint8 image before normalising it (with OpenCV's bilinear), we resize the normalised float image
(``F.interpolate``, bilinear, no antialiasing, as OpenCV's); and it applies a softmax to the merged logits
before the argmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# mmseg's Resize(img_scale=(512 * max_ratio, 512)) in Segmenter's ADE20K pipeline: the long side may reach
# max_ratio times the window.
MAX_RATIO = 4


def _pipeline_size(height: int, width: int, window: int) -> tuple[int, int]:
    """Step 1: mmseg's keep-ratio resize to fit (MAX_RATIO · window, window), mmcv's rounding."""
    scale = min(MAX_RATIO * window / max(height, width), window / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _enlarged_size(height: int, width: int, window: int) -> tuple[int, int]:
    """Step 2: Segmenter's ``utils.resize``: a short side below ``window`` becomes ``window`` (truncated)."""
    if min(height, width) >= window:
        return height, width
    if height < width:
        return window, int(width / height * window)
    return int(height / width * window), window


def segmenter_input_size(height: int, width: int, window: int) -> tuple[int, int]:
    """The size Segmenter evaluates an (height, width) image at (steps 1 and 2 of the module docstring)."""
    return _enlarged_size(*_pipeline_size(height, width, window), window)


def window_anchors(side: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride`` below ``side - window``, then ``side - window``."""
    return [a for a in range(0, side, stride) if a < side - window] + [side - window]


@torch.no_grad()
def sliding_window_logits(model, images: torch.Tensor, window: int, stride: int,
                          batch_size: int = 8) -> torch.Tensor:
    """Full-resolution logits (B, K, H, W) of ``images`` (B, 3, H, W) by Segmenter's sliding window.

    Args:
        model: an ``Incrementer`` (anything with ``logits(images) -> (B, K, H, W)``), in eval mode.
        images: normalised images at their original size.
        window: the window side in pixels; stride: the step between windows, 1 ≤ stride.
        batch_size: windows per forward pass.

    Returns:
        the merged logits resized to (H, W), float32 (float64 for float64 images).

    Examples:
        >>> window_anchors(700, 512, 512), window_anchors(512, 512, 512)
        ([0, 188], [0])
    """
    if not isinstance(window, int) or not isinstance(stride, int) or window < 1 or stride < 1:
        raise ValueError(f"window and stride must be positive ints, got {window!r} and {stride!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    scaled = images
    for size_of in (_pipeline_size, _enlarged_size):  # two resamplings, as Segmenter's pipeline and inference
        size = size_of(*scaled.shape[-2:], window)
        if size != tuple(scaled.shape[-2:]):
            scaled = F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)
    rows, cols = window_anchors(size[0], window, stride), window_anchors(size[1], window, stride)
    anchors = [(r, c) for r in rows for c in cols]
    merged = []
    for image in scaled:
        crops = torch.stack([image[:, r:r + window, c:c + window] for r, c in anchors])
        logits = torch.cat([model.logits(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        total = logits.new_zeros((logits.shape[1], *size))
        count = logits.new_zeros((1, *size))
        for (r, c), window_logits in zip(anchors, logits):
            total[:, r:r + window, c:c + window] += window_logits
            count[:, r:r + window, c:c + window] += 1
        merged.append(total / count)
    merged = torch.stack(merged)
    return F.interpolate(merged, size=(height, width), mode="bilinear", align_corners=False)
