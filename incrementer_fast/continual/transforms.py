"""Training and validation transforms, built from ``torchvision.transforms.v2`` with the label as a
``tv_tensors.Mask``.

A transform takes the PIL image and PIL label map a dataset read (their values already checked, see
datasets.py) and returns a normalised float32 image (3, H, W) and an int64 label (H, W).

Default training augmentation: MiB's and PLOP's (fcdl94/MiB and arthurdouillard/CVPR2021_PLOP, ``run.py``
``get_dataset``: ``RandomResizedCrop(crop_size, (0.5, 2.0))``, ``RandomHorizontalFlip()``, ``ToTensor()``,
``Normalize(ImageNet mean, std)``; their ``dataset/transform.py`` for each step):

* ``RandomResizedCrop``: the aspect ratio is drawn log-uniformly in (3/4, 4/3) (their default), the area
  uniformly in ``scale`` × the image's area; a draw that does not fit in the image is redrawn, up to 10
  times, and then the crop falls back to the whole image (centre crop to the ratio range). With MiB's
  ``scale=(0.5, 2.0)`` every area above 1 is such a misfit, so in effect crops cover 50-100% of the image.
  torchvision's ``v2.RandomResizedCrop`` draws its parameters with exactly this algorithm (the same
  attempts and fallback), from torch's generator instead of Python's ``random``.
* The crop is resized to ``crop_size``: the image bilinearly (PIL, as their transforms resize PIL
  images), the label with PIL's nearest neighbour. ``v2`` resizes a ``Mask`` with
  ``torch.nn.functional.interpolate(mode="nearest")``, which picks the pixel at ``floor(i · scale)``, half a
  pixel off PIL's ``floor((i + 0.5) · scale)`` and off the bilinear image; so our crop resizes the
  label through PIL, and labels are bit-identical to MiB's for the same crop parameters.
* A horizontal flip with probability 1/2; then the image to float in [0, 1], normalised.

The previous default, DeepLab-style rescale (a random factor in ``scale``), pad (the image with the mean
colour, i.e. 0 after normalisation; the label with 255, ignored) and random crop, is the named option
``augmentation="rescale_pad_crop"``.

Validation, MiB's and PLOP's default (``crop_val`` on, their ``run.py``): ``Resize(crop_size)`` (short side
to ``size``, the long side ``int(size · long / short)``; bilinear image, nearest label, PIL) and
``CenterCrop(crop_size)``, scored on the resized label. ``size=None`` keeps the full image (their
``--crop_val`` off, batch size 1; also what sliding-window evaluation uses).

Randomness comes from torch's global generator, so a seeded run (the trainer seeds per image) is
reproducible. The transforms are classes, so DataLoader workers can pickle them.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .config import AUGMENTATIONS
from .scenarios import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIB_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegmentationTransform", "train_transform",
           "val_transform"]


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


def _scale_range(scale) -> tuple[float, float]:
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
    return lo, hi


def _mask_through_pil(mask: tv_tensors.Mask, operation) -> tv_tensors.Mask:
    """Apply ``operation`` (a PIL → PIL function) to a uint8 (H, W) mask: PIL's nearest neighbour."""
    picture = Image.fromarray(mask.numpy().astype(np.uint8, copy=False))
    return tv_tensors.Mask(torch.from_numpy(np.asarray(operation(picture), dtype=np.uint8).copy()))


class RandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` whose masks are resized with PIL's nearest neighbour (MiB/PLOP's labels)."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return _mask_through_pil(inpt, lambda label: F.resized_crop(
                label, **params, size=self.size, interpolation=InterpolationMode.NEAREST))
        return super().transform(inpt, params)


class Resize(v2.Resize):
    """``v2.Resize`` whose masks are resized with PIL's nearest neighbour (MiB/PLOP's labels)."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return _mask_through_pil(inpt, lambda label: F.resize(
                label, self.size, interpolation=InterpolationMode.NEAREST, max_size=self.max_size))
        return super().transform(inpt, params)


class RandomRescale(v2.Transform):
    """Rescale by a factor drawn uniformly in ``scale`` (both sides rounded; image bilinear, mask nearest,
    through PIL): the first stage of the ``rescale_pad_crop`` option."""

    def __init__(self, scale):
        super().__init__()
        self.scale = _scale_range(scale)

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.scale
        factor = lo + (hi - lo) * float(torch.rand(()))
        return dict(size=[max(1, round(height * factor)), max(1, round(width * factor))])

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return _mask_through_pil(inpt, lambda label: F.resize(
                label, params["size"], interpolation=InterpolationMode.NEAREST))
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=InterpolationMode.BILINEAR)


class SegmentationTransform:
    """(PIL image, PIL label) → (float32 image (3, H, W), int64 label (H, W)) through ``v2.Compose`` of
    ``geometric`` (PIL image, Mask label), then to a float image in [0, 1], normalised, then ``after``
    (ops on the normalised image and the mask, e.g. a padded crop)."""

    def __init__(self, geometric, mean=IMAGENET_MEAN, std=IMAGENET_STD, after=()):
        self.mean, self.std = tuple(mean), tuple(std)
        self.pipeline = v2.Compose([
            *geometric,
            v2.ToImage(),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(self.mean, self.std),
            *after,
        ])

    def __call__(self, image: Image.Image, label: Image.Image):
        mask = tv_tensors.Mask(torch.from_numpy(np.array(label, dtype=np.uint8)))
        image, mask = self.pipeline(image, mask)
        return image.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor).long().contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline})"


def train_transform(crop_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(0.5, 2.0),
                    augmentation: str = "random_resized_crop") -> SegmentationTransform:
    """The training augmentation (module docstring).

    Args:
        crop_size: side (or (h, w)) of the training crops.
        mean, std: the normalisation (the backbone's).
        scale: ``random_resized_crop``: the crop's area as a fraction of the image's (MiB/PLOP pass
            (0.5, 2.0); see the module docstring for what areas above 1 do); ``rescale_pad_crop``: the
            range of the random rescaling factor.
        augmentation: ``"random_resized_crop"`` (MiB/PLOP, default) or ``"rescale_pad_crop"``.

    Returns:
        a ``SegmentationTransform``, called as ``transform(image, label)`` on PIL images.

    Examples:
        >>> transform = train_transform(32)
        >>> image, label = transform(Image.new("RGB", (40, 30)), Image.new("L", (40, 30)))
        >>> tuple(image.shape), tuple(label.shape), label.dtype
        ((3, 32, 32), (32, 32), torch.int64)
    """
    crop = _pair(crop_size)
    scale = _scale_range(scale)
    if augmentation == "random_resized_crop":
        geometric = [RandomResizedCrop(crop, scale=scale, ratio=MIB_CROP_RATIO,
                                       interpolation=InterpolationMode.BILINEAR),
                     v2.RandomHorizontalFlip(0.5)]
        return SegmentationTransform(geometric, mean, std)
    if augmentation == "rescale_pad_crop":
        padded_crop = v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0.0,
                                                                     tv_tensors.Mask: IGNORE_INDEX})
        return SegmentationTransform([RandomRescale(scale), v2.RandomHorizontalFlip(0.5)], mean, std,
                                     after=[padded_crop])
    raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")


def val_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> SegmentationTransform:
    """The validation transform (module docstring): short side resized to ``size`` and a centre crop of
    ``size`` × ``size``, or the full image for ``size=None``. Deterministic."""
    if size is None:
        return SegmentationTransform([], mean, std)
    side = _pair(size)[0]
    return SegmentationTransform([Resize(side, interpolation=InterpolationMode.BILINEAR), v2.CenterCrop(side)],
                                 mean, std)
