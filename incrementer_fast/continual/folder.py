"""Your own dataset: a folder with a class list, images, label maps and two split lists.

Layout (``root`` is ``--data-root``)::

    root/classes.txt              one class name per line; line 1 is class 0, the background
    root/images/<id>.jpg|.jpeg|.png  RGB images
    root/labels/<id>.png          single-channel class indices (mode L or P); 255 = void (not trained,
                                  not scored)
    root/splits/train.txt         one id per line (a line may also be a path: only its stem is used)
    root/splits/val.txt

The number of classes is the number of lines of ``classes.txt``. Every check of the VOC and ADE20K loaders
applies, with the same one-line errors (``datasets.SegmentationDataset``): a missing file or folder is named
(FileNotFoundError), an id listed twice or an image under two extensions is named (ValueError), and
``scan()`` decodes every file before training (unreadable files, image modes, sizes, label values outside
``classes.txt`` and 255), cached like the others'.

Two options adapt label files that do not follow the layout exactly, both applied to a label map's values
before anything else (checks included):

* ``ignore_index``: the value that means void in these files (e.g. 0 in a set that marks unlabelled pixels
  with 0); it becomes 255. 255 stays void.
* ``label_map``: a text file of ``SOURCE TARGET`` lines (``#`` starts a comment) for sets whose ids are not
  contiguous (Cityscapes' 34 label ids → its 19 training classes); a value the file does not list becomes
  void 255, and a TARGET must be a class of ``classes.txt`` or 255.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..constants import IGNORE_INDEX
from .datasets import SegmentationDataset, _require
from .split_lists import read_split_list

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_FILES = {"train": "train.txt", "val": "val.txt"}


def read_class_names(root) -> tuple[str, ...]:
    """The class names of ``root/classes.txt`` (line 1 is class 0, the background); FileNotFoundError when
    it is missing, ValueError naming the line for an empty line, a repeated name, fewer than 2 or more than
    255 classes (label values are bytes and 255 is the void)."""
    path = Path(root) / "classes.txt"
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    _require(path, "class list (one class name per line, the background first)")
    # utf-8-sig: a BOM (Windows editors write one) would otherwise become part of class 0's name.
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines
    names, seen = [], {}
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            raise ValueError(f"class list {path}: line {number} is empty (class {number - 1} needs a name)")
        if name in seen:
            raise ValueError(f"class list {path}: {name!r} is on lines {seen[name]} and {number}; "
                             "class names must be unique")
        seen[name] = number
        names.append(name)
    if not 2 <= len(names) <= IGNORE_INDEX:
        raise ValueError(f"class list {path} names {len(names)} classes: expected 2..{IGNORE_INDEX} (the "
                         "background first, then at least one class; 255 is the void)")
    return tuple(names)


def label_lut(num_classes: int, ignore_index: int | None = None, label_map=None) -> np.ndarray | None:
    """The 256-entry table a label file's values go through (``None`` when it would be the identity):
    ``ignore_index`` → 255, and with ``label_map`` (a file, see the module docstring) SOURCE → TARGET and
    every unlisted value → 255. ValueError naming the file and line for a malformed pair."""
    if ignore_index is None and label_map is None:
        return None
    if ignore_index is not None and not 0 <= ignore_index <= 255:
        raise ValueError(f"--ignore-index must lie in 0..255, got {ignore_index}")
    lut = np.arange(256, dtype=np.uint8)
    if label_map is not None:
        lut[:] = IGNORE_INDEX
        path = Path(label_map)
        _require(path, "label map file (--label-map, a path relative to the working directory)")
        sources = {}
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            try:
                source, target = (int(f) for f in fields)
            except ValueError:
                raise ValueError(f"label map {path}, line {number}: expected two integers 'SOURCE TARGET', "
                                 f"got {line.strip()!r}") from None
            if not 0 <= source <= 255 or not (0 <= target < num_classes or target == IGNORE_INDEX):
                raise ValueError(f"label map {path}, line {number}: SOURCE must lie in 0..255 and TARGET be a "
                                 f"class 0..{num_classes - 1} or {IGNORE_INDEX}, got {source} {target}")
            if source in sources:
                raise ValueError(f"label map {path}: value {source} is mapped on lines {sources[source]} and "
                                 f"{number}; keep one")
            sources[source] = number
            lut[source] = target
    if ignore_index is not None:
        lut[ignore_index] = IGNORE_INDEX
    return lut


class FolderSegmentation(SegmentationDataset):
    """A dataset in the folder layout of the module docstring (``--dataset folder --data-root DIR``).

    Args:
        root: the folder holding ``classes.txt``, ``images/``, ``labels/`` and ``splits/``.
        split: ``"train"`` or ``"val"``.
        transform, label_transform, cache_dir: as ``SegmentationDataset``'s.
        ignore_index: the label files' void value, mapped to 255 (``None``: 255 is the void).
        label_map: a ``SOURCE TARGET`` file mapping the label files' values to classes (see above).
    """

    def __init__(self, root, split: str = "train", transform=None, label_transform=None, cache_dir=None,
                 ignore_index: int | None = None, label_map=None):
        super().__init__(transform, label_transform, cache_dir)
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.root, self.split = Path(root), split
        self.class_names = read_class_names(self.root)
        self.num_classes = len(self.class_names)
        self.label_lut = label_lut(self.num_classes, ignore_index, label_map)
        image_dir = _require(self.root / "images", "images folder")
        label_dir = _require(self.root / "labels", "labels folder")
        self.split_list = _require(self.root / "splits" / SPLIT_FILES[split], "split list")
        ids = read_split_list(self.split_list)
        images, labels = {}, {}
        for image_id in ids:
            found = [image_dir / f"{image_id}{s}" for s in IMAGE_SUFFIXES if (image_dir / f"{image_id}{s}").exists()]
            if not found:
                raise FileNotFoundError(f"image not found: {image_dir / image_id}.jpg (or .jpeg, .png), listed in "
                                        f"splits/{SPLIT_FILES[split]}")
            if len(found) > 1:
                raise ValueError(f"two images of the id {image_id!r} in {image_dir}: "
                                 f"{', '.join(p.name for p in found)}; keep one")
            images[image_id] = found[0]
            label = label_dir / f"{image_id}.png"
            lossy = next((label.with_suffix(s) for s in (".jpg", ".jpeg") if label.with_suffix(s).exists()), None)
            if lossy is not None and not label.exists():
                raise ValueError(f"label of image {found[0].name} not found: {label}; found {lossy.name}: "
                                 "labels must be PNG (JPEG is lossy: it corrupts class indices)")
            labels[image_id] = _require(label, f"label of image {found[0].name}")
        self._set_files(ids, images, labels)


def folder_options(config) -> dict:
    """``build_dataset``'s options of a ``folder`` dataset (none for the others)."""
    if config.dataset != "folder":
        return {}
    return dict(ignore_index=config.ignore_index, label_map=config.label_map)
