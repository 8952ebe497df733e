"""The validation set a run was scored on: rebuilt from the run's configuration, and checked against it.

``incrementer-fast eval`` re-scores a saved step. It must score it on the images the run scored it on, or
refuse: a silently substituted set (say the default synthetic set instead of the run's smaller one) gives
numbers that look right and are not. So:

* ``open_validation_set(config, data_root, cache_dir)`` builds the validation split from the run's own
  configuration, through one function per dataset name (``VALIDATION_SET_BUILDERS``; a new dataset plugs in
  there). The synthetic set is regenerated from the config's ``synthetic_*`` fields when its folder is gone
  (the generator is deterministic); a folder holding a synthetic set of other parameters is refused, as is a
  data root without the dataset. Nothing is ever generated with default parameters.
* ``split_fingerprint(image_labels)`` is what training stores in config.json (``evaluation``): the number of
  validation images and a sha256 of their ids and the label values each holds. ``check_fingerprint``
  compares the set eval rebuilt with it and refuses a different one, naming both.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping

from ..errors import InputError
from .config import TrainConfig
from .datasets import SegmentationDataset, build_dataset
from .synthetic import generate_synthetic, read_manifest

# The synthetic manifest's fields and the TrainConfig fields they come from.
_SYNTHETIC_FIELDS = {"seed": "synthetic_seed", "num_train": "synthetic_train_images",
                     "num_val": "synthetic_val_images", "image_size": "synthetic_image_size"}


def _synthetic_validation_set(config: TrainConfig, root: Path, cache_dir) -> SegmentationDataset:
    """The synthetic validation split at ``root``, generated there from the config's ``synthetic_*`` fields
    when absent; InputError when ``root`` holds a synthetic set of other parameters."""
    manifest = read_manifest(root)
    if manifest is not None:
        differing = [f"{field} {manifest.get(key)!r} (the run's {getattr(config, field)!r})"
                     for key, field in _SYNTHETIC_FIELDS.items() if manifest.get(key) != getattr(config, field)]
        if differing:
            raise InputError(f"{root} holds another synthetic dataset than the run's: {', '.join(differing)}; "
                             "remove it (it is regenerated from the run's config) or pass --data-root")
    try:
        generate_synthetic(root, **{key: getattr(config, field) for key, field in _SYNTHETIC_FIELDS.items()})
    except (FileExistsError, ValueError) as error:
        raise InputError(f"cannot rebuild the run's synthetic dataset: {error}") from error
    return build_dataset("synthetic", root, "val", cache_dir=cache_dir)


def _listed_validation_set(config: TrainConfig, root: Path, cache_dir) -> SegmentationDataset:
    """A dataset read from its data root (VOC, ADE20K): InputError naming what is missing there."""
    try:
        return build_dataset(config.dataset, root, "val", cache_dir=cache_dir)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise InputError(f"cannot open the {config.dataset} validation set the run was scored on: {error} "
                         "(pass --data-root where that data is now)") from error


VALIDATION_SET_BUILDERS: dict[str, Callable[[TrainConfig, Path, object], SegmentationDataset]] = {
    "synthetic": _synthetic_validation_set,
    "voc": _listed_validation_set,
    "ade": _listed_validation_set,
}
"""Dataset name -> ``builder(config, data_root, cache_dir)`` returning its validation split."""


def open_validation_set(config: TrainConfig, data_root, cache_dir=None) -> SegmentationDataset:
    """The validation split of ``config.dataset`` at ``data_root``, as the run built it (see the module
    docstring); InputError when it cannot be rebuilt.

    Args:
        config: the run's configuration (its dataset name and, for synthetic, its ``synthetic_*`` fields).
        data_root: where the dataset is (or, for synthetic, is regenerated).
        cache_dir: the scan cache folder (the run's ``cache/``), None for the default one.

    Returns:
        The validation dataset (file lists; nothing decoded yet).
    """
    builder = VALIDATION_SET_BUILDERS.get(config.dataset)
    if builder is None:
        raise InputError(f"eval cannot rebuild the validation set of dataset {config.dataset!r} "
                         f"(known: {', '.join(VALIDATION_SET_BUILDERS)})")
    return builder(config, Path(data_root), cache_dir)


def split_fingerprint(image_labels: Mapping[str, list[int]]) -> dict:
    """``{"val_images": N, "val_sha256": ...}``: the image count and a sha256 of the (id, label values)
    pairs, in id order, of a scanned split (``DatasetScan.labels``)."""
    digest = hashlib.sha256(json.dumps(sorted((i, list(v)) for i, v in image_labels.items())).encode())
    return {"val_images": len(image_labels), "val_sha256": digest.hexdigest()}


def check_fingerprint(found: Mapping, stored: Mapping | None, data_root, run_dir) -> None:
    """InputError unless the rebuilt split's ``found`` fingerprint is the run's ``stored`` one (None: a
    run written before fingerprints were stored, checked by image counts instead)."""
    if stored is None or found == dict(stored):
        return
    raise InputError(
        f"the validation set at {data_root} ({found['val_images']} images, sha256 {found['val_sha256'][:12]}) "
        f"is not the one {run_dir} was scored on ({stored.get('val_images')} images, sha256 "
        f"{str(stored.get('val_sha256'))[:12]}): pass --data-root where the run's data is")
