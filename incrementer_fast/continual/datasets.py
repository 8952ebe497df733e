"""Segmentation datasets (Pascal VOC 2012 aug, ADE20K, the built-in synthetic one).

A dataset yields ``(image, label)``: with a ``transform``, whatever it returns (those of transforms.py give a
normalised float32 image (3, H, W) and an int64 label (H, W)); without one, the image as float32 in
[0, 1] and the label as int64, at full resolution. ``label_transform`` (the trainer passes the step's
remap from ``scenarios``) is applied to the label tensor last.

Label values are checked as they are read: a value that is neither a class (``0..num_classes-1``) nor
the void 255 raises ValueError naming the file, as does an unreadable image or label, or an image and a
label of different sizes. A wrong layout raises FileNotFoundError naming the exact missing path, and an id
listed twice in a split list a ValueError naming the list and the lines.

``scan()`` decodes every image and label map once, before any training: it finds unreadable or truncated
files, images that are not photos (a palette or RGBA image in the images folder), size mismatches and label
values out of range — all named, as an ``InputError`` — and lists the label values each image holds (what
``scenarios.select_images`` filters on; ``image_labels()``). Grayscale and CMYK images are converted to RGB
when loaded, as MiB's and PLOP's loaders do (ADE20K holds a few grayscale photos); ``scan()`` lists them.
The result is cached as JSON in a cache folder, keyed by the ids, paths, sizes and modification times of
the image and label files: editing or replacing one invalidates it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .._files import atomic_write_json
from ..constants import IGNORE_INDEX
from ..errors import InputError
from .scenarios import num_classes as _num_classes
from .split_lists import read_split_list
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from .synthetic import read_manifest


logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


def default_cache_dir() -> Path:
    """``$INCREMENTER_FAST_CACHE``, else ``$XDG_CACHE_HOME/incrementer_fast``, else
    ``~/.cache/incrementer_fast``: outside the data root, which may be read-only."""
    if os.environ.get("INCREMENTER_FAST_CACHE"):
        return Path(os.environ["INCREMENTER_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "incrementer_fast"


# What PIL raises for a file it cannot decode: PIL.UnidentifiedImageError is an OSError; an image whose header
# claims more pixels than twice PIL.Image.MAX_IMAGE_PIXELS raises DecompressionBombError at open (before any
# memory is allocated), which is no OSError.
UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_image(path) -> Image.Image:
    """An RGB PIL image; ValueError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise
    except UNREADABLE_IMAGE as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def load_label(path, num_classes: int, lut: np.ndarray | None = None) -> Image.Image:
    """A single-channel label map (mode L or P) whose values are classes or 255; ValueError naming the
    file otherwise. ``lut`` (256 uint8 entries): the file's values are mapped through it first (a folder
    dataset's ``--ignore-index`` and label map)."""
    label = _read_label(path, lut)
    _check_values(np.asarray(label), num_classes, path)
    return label


def _read_label(path, lut: np.ndarray | None = None) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            label = im.copy()
    except FileNotFoundError:
        raise
    except UNREADABLE_IMAGE as e:
        raise ValueError(f"cannot read label {path}: {e}") from e
    if im.format == "JPEG":  # whatever its name: its values would read as classes the set does not have
        raise ValueError(f"label {path} is a JPEG file (lossy: it corrupts class indices): save labels as PNG")
    if label.mode not in ("L", "P"):
        raise ValueError(
            f"label {path} has mode {label.mode}: expected a single-channel 8-bit index PNG (mode L or P)"
        )
    if lut is not None:
        label = Image.fromarray(lut[np.asarray(label)])
    return label


def _check_values(arr: np.ndarray, num_classes: int, path) -> np.ndarray:
    """The label values present in ``arr`` (sorted); ValueError naming ``path`` if any is out of range."""
    present = np.flatnonzero(np.bincount(arr.reshape(-1), minlength=256))
    bad = [int(v) for v in present if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        raise ValueError(
            f"label {path} holds values {bad} outside the classes 0..{num_classes - 1} and the void "
            f"{IGNORE_INDEX}"
        )
    return present


# Image modes that ``load_image`` converts to RGB without loss of meaning (listed by ``scan()``); any other
# mode but RGB (a palette, RGBA, 16-bit or float image) is refused by ``scan()``.
CONVERTED_IMAGE_MODES = ("L", "CMYK")


def _scan_pair(image_path, label_path, num_classes: int,
               lut: np.ndarray | None = None) -> tuple[list[int], str | None]:
    """Decode an image and its label map: (the label values present, the image's mode if ``load_image``
    converts it to RGB, else None); ValueError naming the file for anything a training run would trip on."""
    try:
        with Image.open(image_path) as im:
            im.load()  # decodes every byte: a truncated file fails here
            mode, size = im.mode, im.size
    except FileNotFoundError:
        raise
    except UNREADABLE_IMAGE as e:
        raise ValueError(f"cannot read image {image_path}: {e}") from e
    if mode != "RGB" and mode not in CONVERTED_IMAGE_MODES:
        raise ValueError(f"image {image_path} has mode {mode}: expected an RGB photo (or grayscale, which is "
                         f"converted); is it a label map or an image with transparency?")
    label = _read_label(label_path, lut)
    values = _check_values(np.asarray(label), num_classes, label_path)
    if label.size != size:
        raise ValueError(f"image {image_path} is {size[0]}x{size[1]} but its label {label_path} is "
                         f"{label.size[0]}x{label.size[1]}")
    return [int(v) for v in values], (None if mode == "RGB" else mode)


class DatasetScan(NamedTuple):
    """What ``SegmentationDataset.scan`` found: the label values of each image, and the images that are
    converted to RGB when loaded (id -> their mode, e.g. ``L`` for grayscale)."""

    labels: dict[str, list[int]]
    converted: dict[str, str]
    from_cache: bool = False  # read from the cache file (``write_scan_cache`` has nothing to write)


def to_tensors(image: Image.Image, label: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 (3, H, W) in [0, 1], int64 (H, W)), no resizing or normalisation."""
    img = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    lab = torch.from_numpy(np.array(label, dtype=np.uint8)).long()
    return img, lab


class SegmentationDataset(torch.utils.data.Dataset):
    """A list of (image, label) files with checked loading, a label-value index and subsets.

    Subclasses set ``num_classes`` (label values including the background) and fill ``ids`` with paths
    through ``_set_files``. ``ids`` is the list of image ids in dataset order.
    """

    num_classes: int = 0
    class_names: tuple[str, ...] | None = None
    # The split list the ids come from (None: a layout without one, ADE20K's folders).
    split_list: Path | None = None
    # 256 uint8 entries mapping a label file's values before they are checked and used (None: as stored).
    label_lut: np.ndarray | None = None

    def __init__(self, transform=None, label_transform=None, cache_dir=None):
        self.transform = transform
        self.label_transform = label_transform
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.ids: list[str] = []
        self._images: dict[str, Path] = {}
        self._labels: dict[str, Path] = {}

    def _set_files(self, ids, images: dict, labels: dict) -> None:
        self.ids = list(ids)
        self._images, self._labels = images, labels

    def image_path(self, image_id: str) -> Path:
        return self._images[image_id]

    def label_path(self, image_id: str) -> Path:
        return self._labels[image_id]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = load_image(self._images[image_id])
        label = load_label(self._labels[image_id], self.num_classes, self.label_lut)
        if image.size != label.size:
            raise ValueError(
                f"image {self._images[image_id]} is {image.size[0]}x{image.size[1]} but its label "
                f"{self._labels[image_id]} is {label.size[0]}x{label.size[1]}"
            )
        if self.transform is not None:
            image, label = self.transform(image, label)
        else:
            image, label = to_tensors(image, label)
        if self.label_transform is not None:
            label = self.label_transform(label)
        return image, label

    def subset(self, ids) -> "SegmentationDataset":
        """A shallow copy restricted to ``ids`` (in the given order); its ``transform`` and
        ``label_transform`` can be changed without touching this dataset. Unknown ids: KeyError."""
        ids = list(ids)
        unknown = [i for i in ids if i not in self._images]
        if unknown:
            raise KeyError(f"{len(unknown)} ids are not in this dataset, e.g. {unknown[:3]}")
        sub = copy.copy(self)
        sub.ids = ids
        return sub

    def _scan_cache_key(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps({"v": 2, "class": type(self).__name__, "num_classes": self.num_classes}).encode())
        if self.label_lut is not None:
            digest.update(self.label_lut.tobytes())
        for image_id in self.ids:
            entry = [image_id]
            for path in (self._images[image_id], self._labels[image_id]):
                st = path.stat()
                entry += [str(path.resolve()), st.st_size, st.st_mtime_ns]
            digest.update(json.dumps(entry).encode())
        return digest.hexdigest()

    def _scan_cache_file(self) -> tuple[str, Path]:
        key = self._scan_cache_key()
        return key, self.cache_dir / f"scan-{type(self).__name__}-{key[:32]}.json"

    def scan(self, progress: bool = False, write_cache: bool = True) -> DatasetScan:
        """Decode every image and label map of this dataset once (threaded, with a progress bar when
        ``progress``), then cache the result in ``cache_dir`` (see the module docstring); with
        ``write_cache=False`` the cache is read but not written (``write_scan_cache`` does it later: a
        run validates both splits before it writes anything).

        Raises ``InputError`` (a ValueError) naming the first bad file and how many are bad: unreadable or
        truncated, an image mode that is not a photo's, image and label sizes that differ, label values
        outside the classes and 255; FileNotFoundError for a file that vanished since the listing.
        """
        key, path = self._scan_cache_file()
        cached = _read_scan_cache(path, key, self.ids, self.num_classes)
        if cached is not None:
            return DatasetScan(cached.labels, {i: m for i, m in cached.converted.items() if i in self._images},
                               from_cache=True)

        def check(image_id):
            try:
                return _scan_pair(self._images[image_id], self._labels[image_id], self.num_classes,
                                  self.label_lut)
            except ValueError as error:
                return error

        workers = min(8, os.cpu_count() or 1)
        split = getattr(self, "split", "")
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PNG/JPEG decoding releases the GIL
            results = list(tqdm(pool.map(check, self.ids), total=len(self.ids), disable=not progress,
                                desc=f"checking the {split} images".replace("  ", " "), leave=False,
                                dynamic_ncols=True))
        failures = [r for r in results if isinstance(r, ValueError)]
        if failures:
            others = len(failures) - 1
            more = f" (and {others} more bad file{'s' if others > 1 else ''} in this split)" if others else ""
            error = InputError(f"{failures[0]}{more}: fix or replace the file, or remove its id from the split")
            error.bad_files = len(failures)  # a run reports the other split's count with it
            raise error
        labels = {i: values for i, (values, _) in zip(self.ids, results)}
        converted = {i: mode for i, (_, mode) in zip(self.ids, results) if mode is not None}
        result = DatasetScan(labels, converted)
        if write_cache:
            self.write_scan_cache(result)
        return result

    def write_scan_cache(self, scan: DatasetScan) -> None:
        """Cache ``scan`` (this dataset's ``scan(write_cache=False)``) in ``cache_dir``, unless it was read
        from there."""
        if not scan.from_cache:
            key, path = self._scan_cache_file()
            atomic_write_json(path, {"key": key, "labels": scan.labels, "converted": scan.converted})

    def image_labels(self, progress: bool = False) -> dict[str, list[int]]:
        """Image id -> sorted label values present in its label map (0 and 255 included when present),
        for the ids of this dataset: ``scan(progress).labels``."""
        return self.scan(progress).labels


def _read_scan_cache(path: Path, key: str, ids: list[str], num_classes: int) -> DatasetScan | None:
    """The scan cached at ``path`` for ``key``, restricted to ``ids``; None when there is none, it is of other
    files (another key), or its content is not a scan of these ids — then a warning names the file, and the
    caller scans again and overwrites it (a cache is never trusted blindly: its labels select the training
    images)."""
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
    except (OSError, ValueError) as error:
        problem = f"unreadable: {error}"
    else:
        if isinstance(cached, dict) and cached.get("key") != key:
            return None
        labels = cached.get("labels") if isinstance(cached, dict) else None
        converted = cached.get("converted") if isinstance(cached, dict) else None
        allowed = set(range(num_classes)) | {IGNORE_INDEX}
        if not isinstance(labels, dict) or not isinstance(converted, dict):
            problem = "not a mapping of labels and converted images"
        elif any(i not in labels for i in ids):
            problem = f"{sum(i not in labels for i in ids)} image(s) missing"
        elif not all(isinstance(labels[i], list) and all(type(v) is int and v in allowed for v in labels[i])
                     for i in ids):
            problem = "label values that are not classes"
        elif not all(isinstance(k, str) and isinstance(m, str) for k, m in converted.items()):
            problem = "malformed converted-image modes"
        else:
            return DatasetScan({i: labels[i] for i in ids}, converted)
    logger.warning(f"scan cache {path} is corrupt ({problem}): scanning the images again to rebuild it")
    return None


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


class VOCSegmentation(SegmentationDataset):
    """Pascal VOC 2012 with the SBD-augmented labels (``SegmentationClassAug``), 21 classes.

    Accepted layouts (``root`` is the folder you pass):

    - images: ``root/VOCdevkit/VOC2012/JPEGImages`` (standard), ``root/PascalVOC12/JPEGImages`` (MiB) or
      ``root/JPEGImages`` (``root`` is the VOC2012 folder itself); ``<id>.jpg``, or ``<id>.png``;
    - labels: ``SegmentationClassAug/<id>.png`` beside ``JPEGImages``, or ``root/SegmentationClassAug``
      (PLOP);
    - split lists: ``train`` reads ``train_aug.txt`` (10,582 ids), ``val`` reads ``val.txt`` (1,449),
      from ``ImageSets/Segmentation/`` or ``splits/`` beside ``JPEGImages`` (MiB), or ``root/list/``
      (PLOP) or ``root/splits/``. A line is an id, or ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``
      (MiB/PLOP/DeepLab lists); only the id is used, files are looked up in the folders above.

    Every listed image and label must exist: otherwise FileNotFoundError naming the first missing file.
    """

    num_classes = _num_classes("voc")
    class_names = VOC_CLASSES
    _SPLIT_FILES = {"train": "train_aug.txt", "val": "val.txt"}

    def __init__(self, root, split: str = "train", transform=None, label_transform=None, cache_dir=None):
        super().__init__(transform, label_transform, cache_dir)
        if split not in self._SPLIT_FILES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root not found: {self.root}")
        voc_candidates = [self.root / "VOCdevkit" / "VOC2012", self.root / "PascalVOC12", self.root]
        voc = next((c for c in voc_candidates if (c / "JPEGImages").is_dir()), None)
        if voc is None:
            raise FileNotFoundError(
                f"VOC images folder not found: {voc_candidates[0] / 'JPEGImages'} "
                f"(also tried {', '.join(str(c / 'JPEGImages') for c in voc_candidates[1:])})"
            )
        label_candidates = [voc / "SegmentationClassAug", self.root / "SegmentationClassAug"]
        label_dir = _first_existing(label_candidates)
        if label_dir is None:
            raise FileNotFoundError(
                f"VOC label folder not found: {label_candidates[0]} (also tried {label_candidates[1]})"
            )
        list_name = self._SPLIT_FILES[split]
        list_candidates = [voc / "ImageSets" / "Segmentation" / list_name, voc / "splits" / list_name,
                           self.root / "list" / list_name, self.root / "splits" / list_name]
        list_file = _first_existing(list_candidates)
        if list_file is None:
            raise FileNotFoundError(
                f"VOC split list not found: {list_candidates[0]} "
                f"(also tried {', '.join(map(str, list_candidates[1:]))})"
            )
        ids = read_split_list(list_file)
        self.split_list = list_file
        images, labels = {}, {}
        image_dir = voc / "JPEGImages"
        for image_id in ids:
            jpg, png = image_dir / f"{image_id}.jpg", image_dir / f"{image_id}.png"
            images[image_id] = jpg if jpg.exists() else png if png.exists() else _require(jpg, "image")
            labels[image_id] = _require(label_dir / f"{image_id}.png", "label")
        self._set_files(ids, images, labels)


class ADE20KSegmentation(SegmentationDataset):
    """ADE20K SceneParsing (``ADEChallengeData2016``), 151 label values.

    Layout: ``root/ADEChallengeData2016/{images,annotations}/{training,validation}`` (or ``root`` being
    ``ADEChallengeData2016`` itself); ``split`` "train" reads ``training``, "val" ``validation``. Ids are
    the image file stems in sorted order (20,210 / 2,000), as MiB and PLOP list them.

    Annotation value 0 ("other": pixels outside the 150 classes) is the background class 0 of the
    scenario, as in MiB's and PLOP's training; values 1..150 are the classes. (For evaluation, MiB's
    loader additionally ignores 0, PLOP's keeps it as background; we keep it, so background IoU is
    reported on ADE like on VOC.)
    """

    num_classes = _num_classes("ade")
    _SPLIT_DIRS = {"train": "training", "val": "validation"}

    def __init__(self, root, split: str = "train", transform=None, label_transform=None, cache_dir=None):
        super().__init__(transform, label_transform, cache_dir)
        if split not in self._SPLIT_DIRS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root not found: {self.root}")
        ade = self.root / "ADEChallengeData2016"
        if not ade.is_dir() and (self.root / "images").is_dir():
            ade = self.root
        sub = self._SPLIT_DIRS[split]
        image_dir = _require(ade / "images" / sub, "ADE20K images folder")
        label_dir = _require(ade / "annotations" / sub, "ADE20K annotations folder")
        files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise FileNotFoundError(f"no images in {image_dir}")
        images = {}
        for p in files:
            if p.stem in images:
                raise ValueError(f"two images of the id {p.stem!r} in {image_dir}: {images[p.stem].name} and "
                                 f"{p.name}; keep one")
            images[p.stem] = p
        ids = list(images)
        labels = {i: _require(label_dir / f"{i}.png", "label") for i in ids}
        self._set_files(ids, images, labels)


class SyntheticSegmentation(VOCSegmentation):
    """The synthetic dataset through the VOC loader (13 classes: background + 12). ``root`` is the folder
    given to ``generate_synthetic``; a missing dataset raises FileNotFoundError naming the manifest."""

    num_classes = _num_classes("synthetic")
    class_names = SYNTHETIC_CLASS_NAMES

    def __init__(self, root, split: str = "train", transform=None, label_transform=None, cache_dir=None):
        manifest = Path(root) / "manifest.json"
        if read_manifest(root) is None:
            raise FileNotFoundError(
                f"{manifest} not found: no synthetic dataset at {root} (create one with "
                f"incrementer_fast.continual.generate_synthetic({str(root)!r}))"
            )
        super().__init__(root, split, transform=transform, label_transform=label_transform,
                         cache_dir=cache_dir)

